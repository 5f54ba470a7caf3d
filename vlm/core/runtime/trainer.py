"""The Lightning ``Trainer`` from the ``trainer`` group, ready for DDP under Hydra."""

from collections.abc import Sequence

import hydra
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig

from vlm.core.runtime.distributed import prepare_script_relaunch


def instantiate_trainer(
    trainer_cfg: DictConfig, callbacks: Sequence[Callback] = (), loggers: Sequence[Logger] = ()
) -> Trainer:
    """Build the trainer; loggers and callbacks come from their groups, never from ``trainer``.

    No loggers means ``logger=False`` (not Lightning's implicit TensorBoard logger).
    """
    trainer: Trainer = hydra.utils.instantiate(
        trainer_cfg, callbacks=list(callbacks), logger=list(loggers) or False
    )
    prepare_script_relaunch(trainer)
    return trainer

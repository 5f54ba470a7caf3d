"""Callbacks from the ``callbacks`` group: one entry per callback, any of them removable.

``LearningRateMonitor`` refuses to run without a logger, so with ``logger=none`` it is left out
(and said so) instead of failing the run at its first step.
"""

import logging

import hydra
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from omegaconf import DictConfig

from vlm.runtime.checkpoint_io import remove_stale_temp_files

log = logging.getLogger(__name__)


class LastCheckpoint(ModelCheckpoint):
    """``last.ckpt``, the file a resume reads: rewritten at every validation (at every epoch's
    end without one) and, with ``every_n_train_steps``, every that many optimizer steps as well,
    so a run killed between validations loses at most that many steps. Lightning's own
    ``ModelCheckpoint`` takes one trigger or the other, not both. The temp files of a write that
    was killed (see ``checkpoint_io``) are removed when the next run starts."""

    def __init__(self, dirpath: str, filename: str = "last", every_n_train_steps: int | None = None) -> None:
        super().__init__(
            dirpath=dirpath, filename=filename, monitor=None, save_top_k=1, enable_version_counter=False
        )
        self.between = every_n_train_steps or 0

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if trainer.is_global_zero and self.dirpath:
            for tmp in remove_stale_temp_files(self.dirpath):
                log.info(f"removed {tmp}, left by a run killed while writing it")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self.between and trainer.global_step % self.between == 0:
            if not self._should_skip_saving_checkpoint(trainer):  # once per optimizer step
                self._save_topk_checkpoint(trainer, self._monitor_candidates(trainer))


def instantiate_callbacks(callbacks_cfg: DictConfig | None, *, have_logger: bool = True) -> list[Callback]:
    """One callback per entry of the ``callbacks`` group (empty for ``callbacks=none``)."""
    callbacks: list[Callback] = []
    for key, entry in (callbacks_cfg or {}).items():
        if not isinstance(entry, DictConfig) or "_target_" not in entry:
            raise ValueError(f"callbacks.{key} needs a _target_, got {entry!r}")
        callback = hydra.utils.instantiate(entry)
        if isinstance(callback, LearningRateMonitor) and not have_logger:
            log.info(f"callbacks.{key} (LearningRateMonitor) skipped: no logger to write to")
            continue
        callbacks.append(callback)
    return callbacks

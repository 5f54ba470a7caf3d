"""The Lightning ``Trainer`` of a run, with its loggers and callbacks, ready for DDP under Hydra.

``make_trainer`` is the one place a run's trainer is put together (``vlm-train``, ``vlm-bench``,
the test harness): loggers from the ``logger`` group, callbacks from ``callbacks``, the skipped
samples' report, the ``stage.frozen_dtype`` callback, then the ``trainer`` group.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import hydra
from lightning.pytorch import Callback, Trainer
from omegaconf import DictConfig, OmegaConf

from vlm.runtime.callbacks import instantiate_callbacks
from vlm.runtime.distributed import prepare_script_relaunch
from vlm.runtime.frozen_dtype import FrozenDtype
from vlm.runtime.identity import run_identity
from vlm.runtime.loggers import instantiate_loggers, log_resolved_config
from vlm.runtime.report import SkippedSamples


def make_trainer(
    cfg: DictConfig,
    extra_callbacks: Sequence[Callback] = (),
    overrides: dict[str, Any] | None = None,
    harness: bool = True,
) -> Trainer:
    """The trainer ``cfg`` describes. ``overrides``: trainer arguments that win over the group's
    (a benchmark's loop length). ``harness=False`` leaves out the loggers and the ``callbacks``
    group, so that nothing writes inside a timed window; ``stage.frozen_dtype`` always applies,
    since it changes what is computed."""
    loggers = instantiate_loggers(cfg.get("logger"), run_identity(cfg)) if harness else []
    log_resolved_config(loggers, cfg)
    callbacks = instantiate_callbacks(cfg.get("callbacks"), have_logger=bool(loggers)) if harness else []
    if harness:
        callbacks.append(SkippedSamples())
    frozen_dtype = OmegaConf.select(cfg, "stage.frozen_dtype", default=None)
    if frozen_dtype:
        callbacks.append(FrozenDtype(frozen_dtype))
    trainer_cfg = OmegaConf.merge(cfg.trainer, overrides) if overrides else cfg.trainer
    trainer: Trainer = hydra.utils.instantiate(
        trainer_cfg, callbacks=[*callbacks, *extra_callbacks], logger=loggers or False
    )
    prepare_script_relaunch(trainer)
    return trainer

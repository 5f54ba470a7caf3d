"""Callbacks from the ``callbacks`` group: one entry per callback, any of them removable.

``LearningRateMonitor`` refuses to run without a logger, so with ``logger=none`` it is left out
(and said so) instead of failing the run at its first step.
"""

import logging

import hydra
from lightning.pytorch.callbacks import Callback, LearningRateMonitor
from omegaconf import DictConfig

log = logging.getLogger(__name__)


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

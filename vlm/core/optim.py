"""Completing the ``_partial_`` optimizer and scheduler configs inside ``configure_optimizers``.

The configs cannot know the parameters, the device or the run length; the module does::

    def configure_optimizers(self):
        return configure_optimizers(
            self.hparams.optimizer, self.hparams.scheduler,
            params=[p for p in self.parameters() if p.requires_grad],
            total_steps=self.trainer.estimated_stepping_batches,
        )
"""

import inspect
import math
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

ParamsT = Iterable[torch.nn.Parameter] | Iterable[dict[str, Any]]


def _flat_params(params: list) -> list[torch.Tensor]:
    flat = []
    for item in params:
        flat.extend(item["params"] if isinstance(item, dict) else [item])
    return flat


def decay_groups(params: Iterable[torch.nn.Parameter]) -> list[dict[str, Any]]:
    """AdamW-style groups: no weight decay on biases and norms (1-D tensors); empty groups left out."""
    params = list(params)
    groups = [
        {"params": [p for p in params if p.ndim >= 2]},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(optimizer: Callable[..., Optimizer], params: ParamsT) -> Optimizer:
    """Call the optimizer partial on ``params`` (tensors or param groups).

    ``fused`` left unset (``None``) becomes ``True`` when every parameter is a floating CUDA
    tensor and the optimizer supports it: one kernel per step instead of one per tensor.
    """
    params = list(params)
    if not _flat_params(params):
        raise ValueError("no trainable parameters: check the stage's freeze recipe")
    preset = optimizer.keywords.get("fused") if isinstance(optimizer, partial) else None
    target = optimizer.func if isinstance(optimizer, partial) else optimizer
    on_cuda = all(p.is_cuda and p.is_floating_point() for p in _flat_params(params))
    if preset is None and on_cuda and "fused" in inspect.signature(target).parameters:
        return optimizer(params, fused=True)
    return optimizer(params)


def configure_optimizers(
    optimizer: Callable[..., Optimizer],
    scheduler: Callable[..., LRScheduler] | None,
    params: ParamsT,
    total_steps: float,
) -> dict[str, Any]:
    """The ``configure_optimizers`` return value: the optimizer and a per-step schedule.

    ``total_steps`` is ``trainer.estimated_stepping_batches`` (optimizer steps, after gradient
    accumulation and across devices); it is infinite when neither max_steps nor max_epochs is set.
    """
    opt = build_optimizer(optimizer, params)
    if scheduler is None:
        return {"optimizer": opt}
    if not math.isfinite(total_steps):
        raise ValueError("a learning-rate schedule needs a finite run: set trainer.max_steps or max_epochs")
    sched = scheduler(optimizer=opt, total_steps=int(total_steps))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}

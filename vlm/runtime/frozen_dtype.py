"""``stage.frozen_dtype``: weights that never train are stored in bf16/fp16 for the fit.

Under mixed precision autocast casts every frozen fp32 weight at each use anyway; storing them
low halves their memory and skips those casts (a frozen 1.1B LLM: 4.4 -> 2.2 GB). Trained
weights stay fp32 for the optimizer. Only with a mixed precision, where autocast reconciles the
dtypes; outside the fit (eval, predict, export) the module is fp32 again. FSDP and DeepSpeed
bring their own mixed-precision settings and are not covered.
"""

from __future__ import annotations

import lightning as L
import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def frozen_dtype(name: str, precision: str | None = None) -> torch.dtype:
    """The dtype ``stage.frozen_dtype`` names; with ``precision``, also that it is a mixed one."""
    if name not in DTYPES:
        raise ValueError(f"stage.frozen_dtype={name!r}: choose from {', '.join(DTYPES)} or null")
    if precision is not None and not str(precision).endswith("-mixed"):
        raise ValueError(
            f"stage.frozen_dtype={name} needs a mixed trainer.precision (bf16-mixed, 16-mixed), "
            f"got {precision}"
        )
    return DTYPES[name]


class FrozenDtype(L.Callback):
    def __init__(self, name: str) -> None:
        self.name, self.dtype = name, frozen_dtype(name)
        self._stored: list[torch.nn.Parameter] = []

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        frozen_dtype(self.name, trainer.precision)
        self._stored = [p for p in pl_module.parameters() if not p.requires_grad and p.is_floating_point()]
        for p in self._stored:
            p.data = p.data.to(self.dtype)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for p in self._stored:
            p.data = p.data.float()
        self._stored = []

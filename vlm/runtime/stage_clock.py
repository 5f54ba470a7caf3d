"""Where a run's wall time goes, written to ``<run>/timing.json`` (``make bench-train`` reads it).

Start-up is the process's start to the first training batch's request (imports, data
generation and reading, tokenizer, model, Lightning's set-up); then the training loop splits
into waiting for batches (``data``), the training step with backward and optimizer
(``compute``), validation and test; ``other`` is what is left (checkpoint writes, loop
bookkeeping, teardown). Validation figures are kept with their wall time, so the first time
a metric crosses a bar can be read off.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import psutil
from lightning.pytorch.callbacks import Callback

PARTS = ("startup", "data", "compute", "validation", "test")


class StageClock(Callback):
    def __init__(self, path: str, metrics: tuple[str, ...] = ("val/acc", "val/loss")) -> None:
        self.path = Path(path)
        self.metrics = metrics
        self.process_start = psutil.Process().create_time()  # wall clock, seconds since the epoch
        self.seconds = dict.fromkeys(PARTS, 0.0)
        self.curve: list[dict] = []
        self._mark = None

    def _since(self) -> float:
        now = time.perf_counter()
        spent, self._mark = now - (self._mark or now), now
        return spent

    def elapsed(self) -> float:
        return time.time() - self.process_start

    def on_train_start(self, trainer, pl_module) -> None:
        self.seconds["startup"] = self.elapsed()
        self._mark = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self.seconds["data"] += self._since()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self.seconds["compute"] += self._since()

    def on_validation_start(self, trainer, pl_module) -> None:
        self._since()  # the gap before it is loop bookkeeping, not data

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        self.seconds["validation"] += self._since()
        figures = {k: float(v) for k, v in trainer.callback_metrics.items() if k in self.metrics}
        self.curve.append({"step": trainer.global_step, "elapsed_s": self.elapsed(), **figures})

    def on_test_start(self, trainer, pl_module) -> None:
        self._mark = time.perf_counter()

    def on_test_end(self, trainer, pl_module) -> None:
        self.seconds["test"] += self._since()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        """Written at the end of fit and again after test, so a run without test has it too."""
        if not trainer.is_global_zero:
            return
        total = self.elapsed()
        other = total - sum(self.seconds.values())
        record = {"total_s": total, **{f"{k}_s": v for k, v in self.seconds.items()}, "other_s": other}
        record |= {"steps": trainer.global_step, "validations": self.curve}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(record, indent=2) + "\n")

"""The sample predictions of an evaluation epoch: the first rows the objective gives, written
into the run as ``predictions/<split>_step<N>.jsonl`` and, when logging to wandb, as a table."""

from __future__ import annotations

import json
from collections.abc import Iterable
from itertools import islice
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import WandbLogger


class SampleTable:
    def __init__(self, size: int) -> None:
        self.size = size
        self.rows: list[dict] = []

    def add(self, rows: Iterable[dict]) -> None:
        """Take rows until the table is full (the rest are never made: rows come lazily)."""
        self.rows += islice(rows, max(0, self.size - len(self.rows)))

    def flush(self, trainer: L.Trainer, split: str, step: int) -> None:
        rows, self.rows = self.rows, []
        if not rows or not trainer.is_global_zero or trainer.sanity_checking:
            return
        out = Path(trainer.default_root_dir) / "predictions" / f"{split}_step{step}.jsonl"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("".join(json.dumps(r) + "\n" for r in rows))
        cols = list(rows[0])
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_table(
                    f"{split}/predictions", columns=cols, data=[[r[c] for c in cols] for r in rows]
                )

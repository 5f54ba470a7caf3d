"""What a run reports besides its metrics: the samples it skipped, as metrics
(``data/skipped_<reason>``), and a summary at its end (checkpoint, final figures, skipped
samples, wall time), in the terminal and the run's log.

Views of one file (a held-out validation slice and the rest of train) share their counts, so
each file is counted once. Under DDP, records rejected at construction are the same on every
rank; samples skipped when read are summed over the ranks.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from pathlib import Path

import lightning as L
import torch

from vlm.data.datasets import READ_REASONS

log = logging.getLogger(__name__)


def sources(datamodule) -> dict[str, object]:
    """split -> dataset, one per file read (views sharing their counts are one)."""
    seen: dict[int, str] = {}
    out = {}
    for split, ds in getattr(datamodule, "datasets", {}).items():
        if id(ds.read_failures) not in seen:
            seen[id(ds.read_failures)] = split
            out[split] = ds
    return out


def skipped(trainer: L.Trainer) -> Counter[str]:
    """Samples skipped so far by reason, every file and (read faults) every rank."""
    datasets = sources(trainer.datamodule).values()
    rejected = sum((ds.rejected for ds in datasets), Counter())
    read = torch.tensor(
        [sum(ds.read_skipped[r] for ds in datasets) for r in READ_REASONS], dtype=torch.float32
    )
    if trainer.world_size > 1:
        read = trainer.strategy.reduce(read.to(trainer.strategy.root_device), reduce_op="sum").cpu()
    return rejected + Counter({r: int(n) for r, n in zip(READ_REASONS, read.tolist(), strict=True) if n})


class SkippedSamples(L.Callback):
    """``data/skipped_<reason>`` after every train epoch and at the end of testing; ``counts``
    holds the last figures, for the summary."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def _log(self, trainer: L.Trainer) -> None:
        if trainer.datamodule is None:
            return
        self.counts = counts = skipped(trainer)
        metrics = {f"data/skipped_{r.replace(' ', '_').strip('<>')}": float(n) for r, n in counts.items()}
        if metrics and trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log(trainer)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log(trainer)


def best_checkpoint(trainer: L.Trainer) -> str:
    """The best file by the ``monitor`` (the checkpoint callback that monitors something)."""
    return next((c.best_model_path for c in trainer.checkpoint_callbacks if c.monitor), "")


def summary(trainer: L.Trainer, metrics: dict[str, float], started: float) -> list[str]:
    """The lines a run ends with (skipped samples: as last logged)."""
    lines = ["run summary"]
    best = best_checkpoint(trainer)
    last = (Path(c.dirpath) / "last.ckpt" for c in trainer.checkpoint_callbacks if c.dirpath)
    last = next((str(p) for p in last if p.is_file()), "")
    if best or last:
        lines.append(
            f"  checkpoint   {last or best}" + (f" (best: {Path(best).name})" if best and last else "")
        )
    shown = {  # the overall figures; the per-type breakdown (acc_<qtype>) is in the logs
        k: v
        for k, v in sorted(metrics.items())
        if k.split("/")[0] in ("train", "val", "test") and "_" not in k
    }
    lines.append("  figures      " + (", ".join(f"{k} {v:.4g}" for k, v in shown.items()) or "none"))
    counts = next((c.counts for c in trainer.callbacks if isinstance(c, SkippedSamples)), Counter())
    lines.append("  skipped      " + (", ".join(f"{n} {r}" for r, n in counts.most_common()) or "none"))
    minutes, seconds = divmod(round(time.monotonic() - started), 60)
    lines.append(f"  wall time    {minutes} min {seconds} s")
    return lines

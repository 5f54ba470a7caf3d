"""The per-component parameter table printed and logged at the start of every run."""

from __future__ import annotations

from collections.abc import Callable

import lightning as L
from rich.console import Console
from rich.table import Table
from torch import nn


def parameter_rows(
    parts: dict[str, nn.Module], trains: Callable[[nn.Parameter], bool] | None = None
) -> list[dict]:
    """One row per component: total and trainable parameters (shared tensors counted once).
    ``trains``: whether a parameter trains now (default ``requires_grad``)."""
    trains = trains or (lambda p: p.requires_grad)
    rows = []
    seen: set[int] = set()
    for name, module in parts.items():
        total = trainable = 0
        for p in module.parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            total += p.numel()
            trainable += p.numel() if trains(p) else 0
        rows.append({"component": name, "total": total, "trainable": trainable})
    rows.append(
        {
            "component": "all",
            "total": sum(r["total"] for r in rows),
            "trainable": sum(r["trainable"] for r in rows),
        }
    )
    return rows


def print_parameter_table(rows: list[dict], console: Console | None = None) -> None:
    table = Table(title="parameters")
    for col in ("component", "total", "trainable", "trainable %"):
        table.add_column(col, justify="left" if col == "component" else "right")
    for r in rows:
        share = 100 * r["trainable"] / max(r["total"], 1)
        table.add_row(r["component"], f"{r['total']:,}", f"{r['trainable']:,}", f"{share:.2f}")
    (console or Console()).print(table)


class ParameterTable(L.Callback):
    """Prints the module's ``parameter_rows()`` when fitting starts (rank 0) and logs them as
    hyper-parameters (``params/<component>/total|trainable``)."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        rows = pl_module.parameter_rows()
        if trainer.is_global_zero:
            print_parameter_table(rows)
        for logger in trainer.loggers:
            logger.log_hyperparams(
                {f"params/{r['component']}/{k}": r[k] for r in rows for k in ("total", "trainable")}
            )

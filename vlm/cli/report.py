"""``vlm-report DIR``: a Hydra multirun folder -> the seed-style results table.

One row per job (swept overrides, or the ``--keys`` given, the metric and its
per-question-type breakdown ``<metric>_<qtype>``, then any ``--extra`` metrics), written as
markdown + CSV; with ``--rows``/``--cols`` naming two keys, also a pivot table and a heatmap.
A job without the metric is a ``failed`` row, never dropped, so a broken cell of an ablation
is visible in the table that reports it.
"""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path

from vlm.cli.multirun import Job, read_multirun, swept_keys

Table = tuple[list[str], list[list[str]]]  # header, rows (cells already formatted)


def _float(cell: str | None) -> float | None:
    try:
        return float(cell) if cell not in (None, "") else None
    except ValueError:
        return None


def pick_row(rows: list[dict[str, str]], metric: str, best: bool, mode: str) -> dict[str, str] | None:
    """The metrics.csv row the job is judged by: the last one that logged ``metric``, or with
    ``best`` the one where it is highest (``mode=max``) or lowest (``mode=min``)."""
    logged = [r for r in rows if _float(r.get(metric)) is not None]
    if not logged:
        return None
    if not best:
        return logged[-1]
    sign = 1 if mode == "max" else -1
    return max(logged, key=lambda r: sign * _float(r[metric]))


def breakdown_columns(jobs: list[Job], metric: str) -> list[str]:
    """``<metric>_<qtype>`` columns in the order the CSV logger wrote them."""
    cols = (c for j in jobs for row in j.metrics[:1] for c in row)
    return list(dict.fromkeys(c for c in cols if c.startswith(f"{metric}_")))


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def extra_value(job: Job, spec: str) -> str:
    """``--extra`` cell: ``name`` is the metric's last logged value, ``name:min``/``name:max``
    its best (``val/loss:min`` after early stopping: the loss of the epoch it kept)."""
    name, _, how = spec.partition(":")
    row = pick_row(job.metrics, name, bool(how), how or "max")
    return _fmt(_float(row[name])) if row else ""


def results_table(
    root: Path, jobs: list[Job], keys: list[str], metric: str, best: bool, mode: str, extra: list[str] = ()
) -> Table:
    qtypes = breakdown_columns(jobs, metric)
    header = ["job", *keys, metric, *qtypes, *extra, "step", "status"]
    names = [job.name(root) for job in jobs]
    if len(set(names)) < len(names):  # several multiruns into one folder: their paths tell them apart
        names = [job.path.relative_to(root).as_posix() for job in jobs]
    rows = []
    for job, name in zip(jobs, names, strict=True):
        row = pick_row(job.metrics, metric, best, mode)
        values = [_fmt(_float(row.get(c))) if row else "" for c in (metric, *qtypes)]
        step = row.get("step", "") if row else ""
        rows.append(
            [
                name,
                *(job.value(k) or "" for k in keys),
                *values,
                *(extra_value(job, spec) for spec in extra),
                step,
                "ok" if row else "failed",
            ]
        )
    return header, rows


def pivot_table(jobs: list[Job], rows_key: str, cols_key: str, metric: str, best: bool, mode: str) -> Table:
    """Mean of ``metric`` per (row value, column value) over the jobs that finished; a cell
    whose jobs all failed reads ``failed``. Values keep sweep order, as the user listed them
    (layer sets, fusions); numbers are sorted (sub-sweeps of one grid may run in any order).
    Jobs without one of the keys (a baseline run beside the sweep) stay out of the pivot; the
    per-job table lists them."""
    for key in (rows_key, cols_key):
        if all(j.value(key) is None for j in jobs):
            raise SystemExit(f"--rows/--cols: no job has a value for '{key}'")
    jobs = [j for j in jobs if j.value(rows_key) is not None and j.value(cols_key) is not None]
    row_vals = _axis(j.value(rows_key) for j in jobs)
    col_vals = _axis(j.value(cols_key) for j in jobs)
    cells: dict[tuple, list[float | None]] = {}
    for job in jobs:
        row = pick_row(job.metrics, metric, best, mode)
        cells.setdefault((job.value(rows_key), job.value(cols_key)), []).append(
            _float(row[metric]) if row else None
        )
    body = []
    for rv in row_vals:
        line = [str(rv)]
        for cv in col_vals:
            got = cells.get((rv, cv), [])
            done = [v for v in got if v is not None]
            line.append(_fmt(sum(done) / len(done)) if done else ("failed" if got else ""))
        body.append(line)
    return [f"{rows_key} \\ {cols_key}", *map(str, col_vals)], body


def _axis(values) -> list[str]:
    """Distinct values in order of appearance; ascending when every one reads as a number."""
    distinct = list(dict.fromkeys(values))
    numbers = [_float(v) for v in distinct]
    if any(n is None for n in numbers):
        return distinct
    return [v for _, v in sorted(zip(numbers, distinct, strict=True))]


def markdown(table: Table) -> str:
    header, rows = table
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_csv(table: Table, path: Path) -> None:
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([table[0], *table[1]])


def heatmap(table: Table, metric: str, path: Path) -> None:
    """The pivot as an annotated heatmap; failed or missing cells are left blank (grey)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    header, rows = table
    values = np.array([[_float(c) if _float(c) is not None else math.nan for c in r[1:]] for r in rows])
    fig, ax = plt.subplots(figsize=(1.2 * len(header) + 2, 0.6 * len(rows) + 1.8))
    ax.set_facecolor("0.85")
    image = ax.imshow(np.ma.masked_invalid(values), cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(header) - 1), header[1:])
    ax.set_yticks(range(len(rows)), [r[0] for r in rows])
    rows_key, cols_key = header[0].split(" \\ ")
    ax.set_xlabel(cols_key)
    ax.set_ylabel(rows_key)
    for i, r in enumerate(rows):
        for k, cell in enumerate(r[1:]):
            dark = _float(cell) is not None and image.norm(_float(cell)) < 0.5
            ax.text(k, i, cell, ha="center", va="center", fontsize=8, color="w" if dark else "k")
    fig.colorbar(image, ax=ax, label=metric)
    ax.set_title(metric)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def report(
    root: Path,
    metric: str = "val/acc",
    best: bool = False,
    mode: str = "max",
    rows: str | None = None,
    cols: str | None = None,
    out: Path | None = None,
    keys: list[str] | None = None,
    extra: list[str] = (),
) -> str:
    """Write the tables (and heatmap) for the multirun at ``root``; returns the markdown.
    ``keys``: the row's columns instead of the swept overrides, and the rows sorted by them."""
    jobs = read_multirun(root)
    out = out or root
    out.mkdir(parents=True, exist_ok=True)
    if keys:
        jobs = sorted(jobs, key=lambda j: [j.value(k) or "" for k in keys])
    keys = list(keys) if keys else swept_keys(jobs)
    for key in (rows, cols):
        if key and key not in keys:
            keys.append(key)
    slug = metric.replace("/", "-")
    how = f"best, {mode}" if best else "final"
    table = results_table(root, jobs, keys, metric, best, mode, list(extra))
    fixed = sorted({f"{k}={v}" for j in jobs for k, v in j.overrides.items() if k not in keys})
    text = f"## {root.name}: {metric} ({how})\n\n"
    text += f"fixed overrides: {' '.join(fixed)}\n\n" if fixed else ""
    text += markdown(table)
    write_csv(table, out / f"report_{slug}.csv")
    if rows and cols:
        pivot = pivot_table(jobs, rows, cols, metric, best, mode)
        text += f"\n### {metric} ({how}): {rows} x {cols}\n\n" + markdown(pivot)
        write_csv(pivot, out / f"pivot_{slug}.csv")
        heatmap(pivot, metric, out / f"pivot_{slug}.png")
    (out / f"report_{slug}.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="vlm-report", description=__doc__.splitlines()[0])
    parser.add_argument("dir", type=Path, help="a Hydra multirun folder (logs/<task>/multiruns/<time>)")
    parser.add_argument("--metric", default="val/acc", help="column of metrics.csv (default: val/acc)")
    parser.add_argument(
        "--best", action="store_true", help="best value over the run instead of the final one"
    )
    parser.add_argument("--mode", choices=("max", "min"), default="max", help="what 'best' means")
    parser.add_argument("--rows", help="swept key for the pivot's rows (with --cols)")
    parser.add_argument("--cols", help="swept key for the pivot's columns (with --rows)")
    parser.add_argument("--out", type=Path, help="output folder (default: the multirun folder)")
    parser.add_argument("--keys", nargs="+", help="config keys as the row's columns, rows sorted by them")
    parser.add_argument(
        "--extra", nargs="+", default=[], help="more metric columns: NAME (last value) or NAME:min|max (best)"
    )
    args = parser.parse_args(argv)
    if bool(args.rows) != bool(args.cols):
        parser.error("--rows and --cols go together")
    try:
        text = report(
            args.dir, args.metric, args.best, args.mode, args.rows, args.cols, args.out, args.keys, args.extra
        )
    except FileNotFoundError as err:
        parser.error(str(err))
    print(text, end="")


if __name__ == "__main__":
    main()

"""``make bench-train``'s table: the default run's three stages timed (``<run>/<stage>/timing.json``,
written by :class:`~vlm.runtime.stage_clock.StageClock`), time to the accuracy bar, and the
final test accuracy per question type.

    python -m vlm.bench.train_report logs/bench_train/<time> [--bar 0.9]
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

STAGES = ("stage1", "stage1b", "stage2")
PARTS = ("startup", "data", "compute", "validation", "test", "other")


def last_values(run: Path) -> dict[str, float]:
    """The last logged value of each column of the run's csv metrics."""
    out: dict[str, float] = {}
    for path in sorted(run.glob("csv/version_*/metrics.csv")):
        with path.open() as f:
            for row in csv.DictReader(f):
                out |= {k: float(v) for k, v in row.items() if v not in ("", None)}
    return out


def report(root: Path, bar: float) -> str:
    timings = {s: json.loads((root / s / "timing.json").read_text()) for s in STAGES}
    lines = [
        f"## time to accuracy: {root}",
        "",
        "| stage | wall | " + " | ".join(PARTS) + " | steps |",
        "|---|---|" + "---|" * len(PARTS) + "---|",
    ]
    for stage, t in timings.items():
        cells = " | ".join(f"{t[f'{p}_s']:.1f} s" for p in PARTS)
        lines.append(f"| {stage} | {t['total_s']:.1f} s | {cells} | {t['steps']} |")
    total = sum(t["total_s"] for t in timings.values())
    before = total - timings["stage2"]["total_s"]
    sums = " | ".join(f"{sum(t[f'{p}_s'] for t in timings.values()):.1f} s" for p in PARTS)
    lines.append(f"| **all** | **{total:.1f} s** | {sums} | |")
    test = last_values(root / "stage2")
    acc = test.get("test/acc")
    types = ", ".join(
        f"{k.removeprefix('test/acc_')} {v:.3f}" for k, v in sorted(test.items()) if k.startswith("test/acc_")
    )
    crossed = next((v for v in timings["stage2"]["validations"] if v.get("val/acc", 0) >= bar), None)
    lines += [
        "",
        f"- test accuracy at the end: {acc:.4f} ({types})"
        if acc is not None
        else "- no test accuracy logged",
        f"- time to {bar} test accuracy: "
        + (
            f"**{total / 60:.1f} min** (the whole recipe)"
            if acc is not None and acc >= bar
            else "not reached"
        ),
        f"- first validation at val/acc >= {bar}: "
        + (f"step {crossed['step']}, {(before + crossed['elapsed_s']) / 60:.1f} min" if crossed else "none"),
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="the make train folder holding stage1, stage1b, stage2")
    parser.add_argument("--bar", type=float, default=0.9, help="the test accuracy to reach")
    args = parser.parse_args()
    text = report(args.run, args.bar)
    (args.run / "bench_train.md").write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main()

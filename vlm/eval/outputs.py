"""What a benchmark run leaves in its folder: ``predictions.jsonl`` (one row per item),
``score.json`` (the figures and what they are of), ``row.md`` (one row of a results table) and,
where the benchmark has an upload format, ``submission.json``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vlm.eval.base import Benchmark


def write_outputs(
    folder: Path,
    benchmark: Benchmark,
    predictions: dict[str, str],
    scores: dict[str, float],
    header: dict[str, Any],
) -> dict[str, Path]:
    """Write the files; ``header`` leads score.json (benchmark, split, checkpoint, counts)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {name: folder / name for name in ("predictions.jsonl", "score.json", "row.md")}
    with open(paths["predictions.jsonl"], "w", encoding="utf-8") as f:
        for it in benchmark.items():
            row = {
                "id": it.id,
                "question": it.question,
                "prediction": predictions.get(it.id),
                "answer": it.answer,
            }
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    paths["score.json"].write_text(
        json.dumps({**header, "scores": scores, **benchmark.info()}, indent=2) + "\n"
    )
    paths["row.md"].write_text(table_row(benchmark, header["scored"], scores) + "\n")
    submission = benchmark.submission(predictions)
    if submission is not None:
        paths["submission.json"] = folder / "submission.json"
        paths["submission.json"].write_text(json.dumps(submission))
    return paths


def table_row(benchmark: Benchmark, n: int, scores: dict[str, float]) -> str:
    """``| benchmark | split | n | headline figures |``, in score.json's units."""
    figures = ", ".join(f"{k} {scores[k]:.4f}" for k in benchmark.headline if k in scores)
    return f"| {benchmark.name} | {benchmark.split or '-'} | {n} | {figures or 'not scored'} |"

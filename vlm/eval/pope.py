"""POPE (Li et al. 2023) from its published question files, scored as its evaluate.py scores.

    <root>/coco_pope_<split>.json   JSON lines: {"question_id", "image", "text", "label": "yes"|"no"}
    <image_folder>/<image>          (default <root>/val2014)

The splits are the three ways the absent objects are sampled: random, popular, adversarial.
"""

from __future__ import annotations

import json
from pathlib import Path

from vlm.eval.base import Benchmark, BenchmarkError, Item

SPLITS = ("random", "popular", "adversarial")


def pope_answer(text: str) -> str:
    """POPE's reading of a free answer: its first sentence, commas dropped, split at spaces;
    "no" when a word is "No", "no" or "not" (case as written), else "yes"."""
    words = text.split(".")[0].replace(",", "").split(" ")
    return "no" if {"No", "no", "not"} & set(words) else "yes"


def pope_metrics(predictions: list[str], labels: list[str]) -> dict[str, float]:
    """Accuracy, and precision, recall and F1 of "yes" (an object said to be there), plus the
    share of "yes" answers; a ratio with nothing to divide is 0 (the official script stops)."""
    pairs = list(zip(predictions, labels, strict=True))
    tp = sum(p == "yes" and y == "yes" for p, y in pairs)
    fp = sum(p == "yes" and y == "no" for p, y in pairs)
    fn = sum(p == "no" and y == "yes" for p, y in pairs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {
        "accuracy": sum(p == y for p, y in pairs) / len(pairs),
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "yes_ratio": predictions.count("yes") / len(predictions),
    }


class POPE(Benchmark):
    """``split`` is one of random / popular / adversarial, or ``all`` for the three. Figures per
    split (``<split>/accuracy``, ``precision``, ``recall``, ``f1``, ``yes_ratio``) and their
    means over the splits scored (``f1``, ``accuracy``: LLaVA-1.5 reports the mean F1). A label
    other than "no" counts as "yes", as in evaluate.py."""

    name = "pope"
    headline = ("f1", "accuracy")

    @property
    def splits(self) -> tuple[str, ...]:
        if self.split == "all":
            return SPLITS
        if self.split not in SPLITS:
            raise BenchmarkError(f"pope: split {self.split!r} is none of {', '.join(SPLITS)} or all")
        return (self.split,)

    def read(self) -> list[Item]:
        folder = self.image_folder or self.root / "val2014"
        return [item for split in self.splits for item in self._read(split, folder)]

    def _read(self, split: str, folder: Path) -> list[Item]:
        path = self.root / f"coco_pope_{split}.json"
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            raise BenchmarkError(f"{path}: no such file (expected POPE's {split} questions)") from None
        items = []
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise BenchmarkError(f"{path}: line {n} is not JSON ({e.msg})") from None
            missing = [
                k
                for k in ("question_id", "image", "text", "label")
                if not isinstance(rec, dict) or k not in rec
            ]
            if missing:
                raise BenchmarkError(f"{path}: line {n} has no {missing[0]!r}")
            meta = {"split": split, "question_id": rec["question_id"]}
            items.append(
                Item(f"{split}/{rec['question_id']}", folder / rec["image"], rec["text"], rec["label"], meta)
            )
        return items

    def score(self, predictions: dict[str, str]) -> dict[str, float]:
        out: dict[str, float] = {}
        answered = self.answered(predictions)
        for split in self.splits:
            pairs = [
                (pope_answer(p), "no" if it.answer == "no" else "yes")
                for it, p in answered
                if it.meta["split"] == split
            ]
            if pairs:
                figures = pope_metrics(*map(list, zip(*pairs, strict=True)))
                out.update({f"{split}/{k}": v for k, v in figures.items()})
        scored = [s for s in self.splits if f"{s}/f1" in out]
        for key in ("f1", "accuracy"):
            if scored:
                out[key] = sum(out[f"{s}/{key}"] for s in scored) / len(scored)
        return out

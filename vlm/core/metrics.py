"""VQA accuracy: normalised exact match, overall and per question type, synced across ranks."""

from __future__ import annotations

import re

import torch
from torchmetrics import Metric

_NUMBERS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_ARTICLES = {"a", "an", "the"}
_PUNCT = re.compile(r"[^\w\s]")


def normalize_answer(text: str) -> str:
    """The VQA evaluation's normalisation (Antol et al. 2015): lower case, punctuation and
    articles removed, number words as digits, whitespace collapsed."""
    words = _PUNCT.sub(" ", text.lower()).split()
    return " ".join(_NUMBERS.get(w, w) for w in words if w not in _ARTICLES)


class VQAAccuracy(Metric):
    """Exact match after :func:`normalize_answer`; ``compute`` returns ``{"all": acc, qtype: acc}``.

    Question types are fixed at construction so the per-type counters are plain tensor states
    that torchmetrics sums across DDP ranks.
    """

    full_state_update = False

    def __init__(self, qtypes: list[str], **kwargs):
        super().__init__(**kwargs)
        self.qtypes = list(qtypes)
        n = len(self.qtypes) + 1  # last slot: types not in the list
        self.add_state("correct", default=torch.zeros(n), dist_reduce_fx="sum")
        self.add_state("total", default=torch.zeros(n), dist_reduce_fx="sum")

    def update(self, predictions: list[str], answers: list[str], qtypes: list[str]) -> None:
        for pred, ans, qt in zip(predictions, answers, qtypes, strict=True):
            i = self.qtypes.index(qt) if qt in self.qtypes else len(self.qtypes)
            self.total[i] += 1
            self.correct[i] += float(normalize_answer(pred) == normalize_answer(ans))

    def compute(self) -> dict[str, torch.Tensor]:
        out = {"all": self.correct.sum() / self.total.sum().clamp(min=1)}
        for i, qt in enumerate(self.qtypes):
            if self.total[i] > 0:
                out[qt] = self.correct[i] / self.total[i]
        return out

"""The VQA accuracy of a prediction against several annotators' answers (Antol et al. 2015).

An answer is fully right when at least 3 annotators gave it: ``min(1, #matches / 3)``. The
official scripts average that over the subsets that leave one annotator out (10 subsets of 9),
so with 10 annotators 1 match scores 0.3, 2 score 0.6, 3 score 0.9 and 4 or more 1.
"""

from __future__ import annotations

from collections.abc import Sequence


def consensus_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Mean over leave-one-out subsets of ``min(1, matches among the others / 3)``; answers are
    compared as given (each benchmark normalises both sides as its official script does)."""
    matches = sum(a == prediction for a in answers)
    others = [min(1.0, (matches - (a == prediction)) / 3) for a in answers]
    return sum(others) / len(others)

"""GQA (Hudson & Manning 2019) from its published balanced questions, scored by exact match.

<root>/<split>_balanced_questions.json   {qid: {"imageId", "question", "answer",
                                           "types": {"structural", "semantic", "detailed"}, ...}}
<image_folder>/<imageId>.jpg             (default <root>/images)
"""

from __future__ import annotations

from vlm.core.metrics import normalize_answer
from vlm.eval.base import Benchmark, BenchmarkError, Item, accuracy_by_group, load_json


class GQA(Benchmark):
    """``accuracy`` and ``accuracy/<structural type>`` (verify, query, choose, logical,
    compare): exact match of prediction and answer, both through :func:`normalize_answer`.
    GQA's eval.py compares the strings as given and LLaVA lower-cases the prediction and strips
    a final period first; GQA's answers are single lower-case words, which the VQA
    normalisation leaves alone, so the figure is LLaVA's with articles and number words also
    forgiven."""

    name = "gqa"
    headline = ("accuracy",)

    def read(self) -> list[Item]:
        path = self.root / f"{self.split}_balanced_questions.json"
        data = load_json(path, f"the GQA {self.split} balanced questions")
        if not isinstance(data, dict):
            raise BenchmarkError(f"{path}: expected a JSON object mapping question ids to questions")
        folder = self.image_folder or self.root / "images"
        items = []
        for qid, rec in data.items():
            missing = [k for k in ("imageId", "question") if not isinstance(rec, dict) or k not in rec]
            if missing:
                raise BenchmarkError(f"{path}: question {qid} has no {missing[0]!r}")
            structural = (rec.get("types") or {}).get("structural")
            meta = {"structural": structural}
            items.append(
                Item(str(qid), folder / f"{rec['imageId']}.jpg", rec["question"], rec.get("answer"), meta)
            )
        return items

    def score(self, predictions: dict[str, str]) -> dict[str, float]:
        scored = [
            (it.meta["structural"], float(normalize_answer(p) == normalize_answer(it.answer)))
            for it, p in self.answered(predictions)
        ]
        return accuracy_by_group(scored)

    def submission(self, predictions: dict[str, str]) -> list[dict]:
        """``[{"questionId", "prediction"}]``, the predictions file GQA's eval.py and server read."""
        return [
            {"questionId": it.id, "prediction": normalize_answer(predictions.get(it.id, ""))}
            for it in self.items()
        ]

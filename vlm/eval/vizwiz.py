"""VizWiz-VQA (Gurari et al. 2018) from its published files, scored as the VizWiz API scores.

    <root>/<split>.json        [{"image", "question", "answers": [{"answer", "answer_confidence"}] * 10,
                                 "answerable", "answer_type"}]   (test: no answers, no answer_type)
    <image_folder>/<image>     (default <root>/<split>)

Each image carries one question, so the image's file name is the item's id.
"""

from __future__ import annotations

from vlm.core.metrics import normalize_answer
from vlm.eval.base import Benchmark, Item, accuracy_by_group, answer_list, load_json, records
from vlm.eval.consensus import consensus_accuracy

UNANSWERABLE = (
    "\nWhen the provided information is insufficient, respond with 'Unanswerable'."
    "\nAnswer the question using a single word or phrase."
)  # LLaVA-1.5's VizWiz prompt


class VizWiz(Benchmark):
    """``accuracy`` and ``accuracy/<answer type>`` (other, yes_no, number, unanswerable): the mean
    :func:`consensus_accuracy` of the normalised prediction (:func:`normalize_answer`) against
    the 10 answers as published, which the VizWiz API does not normalise."""

    name = "vizwiz"
    headline = ("accuracy",)
    default_suffix = UNANSWERABLE

    def read(self) -> list[Item]:
        path = self.root / f"{self.split}.json"
        data = records(
            load_json(path, f"the VizWiz {self.split} annotations"), path, None, ("image", "question")
        )
        folder = self.image_folder or self.root / self.split
        items = []
        for i, rec in enumerate(data):
            answers = answer_list(rec, path, i) if rec.get("answers") else None
            meta = {"answer_type": rec.get("answer_type"), "answerable": rec.get("answerable")}
            items.append(Item(rec["image"], folder / rec["image"], rec["question"], answers, meta))
        return items

    def score(self, predictions: dict[str, str]) -> dict[str, float]:
        scored = [
            (it.meta["answer_type"], consensus_accuracy(normalize_answer(p), it.answer))
            for it, p in self.answered(predictions)
        ]
        return accuracy_by_group(scored)

    def submission(self, predictions: dict[str, str]) -> list[dict]:
        """``[{"image", "answer"}]``, the upload format of the VizWiz challenge on EvalAI."""
        return [
            {"image": it.id, "answer": normalize_answer(predictions.get(it.id, ""))} for it in self.items()
        ]

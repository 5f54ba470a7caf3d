"""TextVQA (Singh et al. 2019) from its published file, scored as its official evaluation.

    <root>/TextVQA_0.5.1_<split>.json   {"data": [{"question_id", "question", "image_id",
                                                   "answers": [10 strings], ...}]}
    <image_folder>/<image_id>.jpg       (default <root>/train_images, val's too; test: test_images)

The test file has no answers: nothing is scored there, and the submission is what EvalAI takes.
"""

from __future__ import annotations

from vlm.core.metrics import evalai_answer
from vlm.eval.base import Benchmark, BenchmarkError, Item, load_json, records
from vlm.eval.consensus import consensus_accuracy


class TextVQA(Benchmark):
    """``accuracy``: the mean :func:`consensus_accuracy` of the prediction against the 10
    answers, every one of them and the prediction put through EvalAI's answer processor
    (:func:`evalai_answer`), as the TextVQA evaluation (MMF's ``TextVQAAccuracyEvaluator``,
    LLaVA's ``eval_textvqa``) does."""

    name = "textvqa"
    headline = ("accuracy",)

    def read(self) -> list[Item]:
        path = self.root / f"TextVQA_0.5.1_{self.split}.json"
        data = records(
            load_json(path, f"the TextVQA {self.split} file"),
            path,
            "data",
            ("question_id", "question", "image_id"),
        )
        folder = self.image_folder or self.root / ("test_images" if self.split == "test" else "train_images")
        items = []
        for i, rec in enumerate(data):
            answers = rec.get("answers")
            if answers is not None and not (isinstance(answers, list) and answers):
                raise BenchmarkError(f"{path}: record {i}: 'answers' must be a non-empty list of strings")
            answers = [str(a) for a in answers] if answers else None
            meta = {"question_id": rec["question_id"]}
            items.append(
                Item(
                    str(rec["question_id"]), folder / f"{rec['image_id']}.jpg", rec["question"], answers, meta
                )
            )
        return items

    def score(self, predictions: dict[str, str]) -> dict[str, float]:
        scored = [
            consensus_accuracy(evalai_answer(p), [evalai_answer(a) for a in it.answer])
            for it, p in self.answered(predictions)
        ]
        return {"accuracy": sum(scored) / len(scored)} if scored else {}

    def submission(self, predictions: dict[str, str]) -> list[dict]:
        """``[{"question_id", "answer"}]``, as the TextVQA challenge on EvalAI takes it."""
        return [
            {"question_id": it.meta["question_id"], "answer": evalai_answer(predictions.get(it.id, ""))}
            for it in self.items()
        ]

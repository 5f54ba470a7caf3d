"""VQAv2 (Goyal et al. 2017) from its published files, scored as its evaluation server scores.

    <root>/v2_OpenEnded_mscoco_<split>_questions.json   {"questions": [{"image_id", "question",
                                                                       "question_id"}]}
    <root>/v2_mscoco_<split>_annotations.json           {"annotations": [{"question_id", "answer_type",
                                                          "answers": [{"answer", ...}] * 10, ...}]}
    <image_folder>/COCO_<split>_<image_id:012d>.jpg     (test-dev2015 and test2015: COCO_test2015_...)

Test splits publish no annotations: their items have no answer, nothing is scored, and the
submission file is what the server takes.
"""

from __future__ import annotations

from vlm.core.metrics import clean_answer, normalize_answer
from vlm.eval.base import Benchmark, BenchmarkError, Item, accuracy_by_group, answer_list, load_json, records
from vlm.eval.consensus import consensus_accuracy


def vqav2_accuracy(prediction: str, answers: list[str]) -> float:
    """vqaEval.py's accuracy of one answer (GT-Vision-Lab/VQA, as fixed in 2021): both sides are
    cleaned (newlines, tabs, outer spaces), and normalised only when the annotators disagree; an
    answer all of them gave is compared as written."""
    prediction, answers = clean_answer(prediction), [clean_answer(a) for a in answers]
    if len(set(answers)) > 1:
        prediction, answers = normalize_answer(prediction), [normalize_answer(a) for a in answers]
    return consensus_accuracy(prediction, answers)


class VQAv2(Benchmark):
    """``accuracy`` and ``accuracy/<answer type>`` (yes_no, number, other), each the mean of the
    questions' :func:`vqav2_accuracy`. The prediction is submitted normalised
    (:func:`normalize_answer`), as LLaVA and lmms-eval submit theirs: the server compares it as
    written where the annotators agree, so "Yes" would miss a unanimous "yes"."""

    name = "vqav2"
    headline = ("accuracy",)

    @property
    def image_split(self) -> str:
        """test-dev2015 is a subset of test2015 and its images are test2015's."""
        return "test2015" if self.split.startswith("test") else self.split

    def read(self) -> list[Item]:
        qpath = self.root / f"v2_OpenEnded_mscoco_{self.split}_questions.json"
        apath = self.root / f"v2_mscoco_{self.split}_annotations.json"
        questions = records(
            load_json(qpath, f"the VQAv2 {self.split} questions"),
            qpath,
            "questions",
            ("image_id", "question", "question_id"),
        )
        annotations = {}
        if not (self.split.startswith("test") and not apath.exists()):
            data = load_json(apath, f"the VQAv2 {self.split} annotations")
            for i, rec in enumerate(
                records(data, apath, "annotations", ("question_id", "answers", "answer_type"))
            ):
                annotations[rec["question_id"]] = (answer_list(rec, apath, i), rec["answer_type"])
        folder = self.image_folder or self.root / self.image_split
        items = []
        for q in questions:
            qid = q["question_id"]
            if annotations and qid not in annotations:
                raise BenchmarkError(f"{apath}: no annotation for question_id {qid} of {qpath.name}")
            answers, answer_type = annotations.get(qid, (None, None))
            image = folder / f"COCO_{self.image_split}_{int(q['image_id']):012d}.jpg"
            meta = {"question_id": qid, "answer_type": answer_type}
            items.append(Item(str(qid), image, q["question"], answers, meta))
        return items

    def score(self, predictions: dict[str, str]) -> dict[str, float]:
        scored = [
            (it.meta["answer_type"], vqav2_accuracy(normalize_answer(p), it.answer))
            for it, p in self.answered(predictions)
        ]
        return accuracy_by_group(scored)

    def submission(self, predictions: dict[str, str]) -> list[dict]:
        """``[{"question_id", "answer"}]``, the upload format of the VQA challenge on EvalAI; a
        skipped question is answered "" (the server wants every question of the split)."""
        return [
            {"question_id": it.meta["question_id"], "answer": normalize_answer(predictions.get(it.id, ""))}
            for it in self.items()
        ]

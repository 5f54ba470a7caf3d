"""MME (Fu et al. 2023) from its released folder, scored as its eval_tool/calculation.py scores.

    <root>/<subtask>/images/<stem>.jpg + <root>/<subtask>/questions_answers_YN/<stem>.txt
        for artwork, celebrity, landmark, posters and scene;
    <root>/<subtask>/<stem>.{jpg,png} + <root>/<subtask>/<stem>.txt   for the others.

Each txt holds an image's questions, one a line: ``question<TAB>Yes|No`` (two per image, one
answered Yes and one No). Subtasks without a folder are left out, and the score says which.
"""

from __future__ import annotations

from collections import defaultdict
from functools import cached_property
from pathlib import Path
from typing import Any

from vlm.eval.base import Benchmark, BenchmarkError, Item

PERCEPTION = (
    "existence",
    "count",
    "position",
    "color",
    "posters",
    "celebrity",
    "scene",
    "landmark",
    "artwork",
    "OCR",
)
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
IMAGES_APART = ("artwork", "celebrity", "landmark", "posters", "scene")  # images/ + questions_answers_YN/


def mme_answer(text: str) -> str:
    """MME's reading of a free answer, lower-cased: "yes" or "no" as they are, else the first
    four characters decide ("yes" in them, else "no" in them), else "other", never right."""
    text = text.lower()
    if text in ("yes", "no"):
        return text
    head = text[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


class MME(Benchmark):
    """Per subtask ``<subtask>/acc`` (questions right), ``<subtask>/acc_plus`` (images with
    both questions right) and ``<subtask>/score`` = 100 (acc + acc+), out of 200; ``perception``
    and ``cognition`` sum the scores of their subtasks present (out of 2000 and 800 with all).
    MME has no splits and keeps its images beside the questions: ``split`` and
    ``image_folder`` stay None."""

    name = "mme"
    headline = ("perception", "cognition")

    @cached_property
    def present(self) -> list[str]:
        return [t for t in (*PERCEPTION, *COGNITION) if (self.root / t).is_dir()]

    def read(self) -> list[Item]:
        if self.split is not None or self.image_folder is not None:
            raise BenchmarkError(
                "mme: no splits, and the images sit beside their questions: leave split and image_folder null"
            )
        if not self.present:
            raise BenchmarkError(
                f"{self.root}: no MME subtask folder in it (expected e.g. existence/ or artwork/images/)"
            )
        return [item for task in self.present for item in self._read(task)]

    def _read(self, task: str) -> list[Item]:
        folder = self.root / task
        apart = task in IMAGES_APART
        questions, images = (
            (folder / "questions_answers_YN", folder / "images") if apart else (folder, folder)
        )
        txts = sorted(questions.glob("*.txt"))
        if not txts:
            raise BenchmarkError(f"{questions}: no question files (expected <image stem>.txt files)")
        items = []
        for txt in txts:
            image = _image(images, txt.stem)
            for n, line in enumerate(txt.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                question, tab, answer = line.rpartition("\t")
                if not tab or answer.strip().lower() not in ("yes", "no"):
                    raise BenchmarkError(f"{txt}: line {n} is not 'question<TAB>Yes|No'")
                meta = {"subtask": task, "image": txt.stem}
                items.append(Item(f"{task}/{txt.stem}/{n}", image, question.strip(), answer.strip(), meta))
        return items

    def score(self, predictions: dict[str, str]) -> dict[str, float]:
        right: dict[str, dict[str, list[bool]]] = defaultdict(
            lambda: defaultdict(list)
        )  # task -> image -> each question
        for it, p in self.answered(predictions):
            right[it.meta["subtask"]][it.meta["image"]].append(mme_answer(p) == it.answer.lower())
        out: dict[str, float] = {}
        for task in self.present:
            if task not in right:
                continue
            per_image = right[task].values()
            acc = sum(map(sum, per_image)) / sum(map(len, per_image))
            acc_plus = sum(map(all, per_image)) / len(per_image)
            out |= {f"{task}/acc": acc, f"{task}/acc_plus": acc_plus, f"{task}/score": 100 * (acc + acc_plus)}
        for total, tasks in (("perception", PERCEPTION), ("cognition", COGNITION)):
            scores = [out[f"{t}/score"] for t in tasks if f"{t}/score" in out]
            if scores:
                out[total] = sum(scores)
        return out

    def info(self) -> dict[str, Any]:
        return {
            "subtasks": self.present,
            "absent": [t for t in (*PERCEPTION, *COGNITION) if t not in self.present],
        }


def _image(folder: Path, stem: str) -> Path:
    """The image a question file is about: ``<stem>.jpg`` or ``.png`` (a missing one is named
    as .jpg and skipped or raised on when it is read)."""
    for ext in (".jpg", ".png"):
        if (folder / f"{stem}{ext}").exists():
            return folder / f"{stem}{ext}"
    return folder / f"{stem}.jpg"

"""The test split's VQA questions, and VQAv2's question and annotation files for them.

VQAv2 (Goyal et al. 2017) names a split by its `data_subtype`; ours is `shapes`, so the files are
v2_OpenEnded_mscoco_shapes_questions.json, v2_mscoco_shapes_annotations.json and the images
shapes/COCO_shapes_<12-digit image id>.jpg, as the official COCO_val2014_... names.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..questions import QTYPES
from ..writers import ImageEntry, json_bytes

SPLIT = "shapes"
ANSWERS = 10  # VQAv2 collects ten answers per question; here all ten annotators agree
ANSWER_TYPES = {"exists": "yes/no", "count": "number"}  # every other question type: "other"
# The openings of VQAv2's 65 question types (mscoco_question_types.txt) that ShapesWorld's
# questions can start with; a question's type is the longest one it starts with.
QUESTION_TYPES = (
    "how many",
    "is",
    "is the",
    "is there",
    "is there a",
    "what",
    "what color",
    "what color is",
    "what color is the",
)
INFO = {"description": "ShapesWorld's test split in the VQAv2 format", "version": "2.0"}
LICENSE = {"name": "generated data (ShapesWorld)", "url": ""}


@dataclass(frozen=True)
class Question:
    """One VQA question about one test image; `id` is unique in the split and stays the same
    for an (image, question type) when other types are added."""

    id: int
    entry: ImageEntry
    qtype: str
    text: str
    answer: str


def vqa_questions(entries: list[ImageEntry], records: list[dict]) -> list[Question]:
    """The test records' questions, captions left out (a caption is not a VQA answer)."""
    by_image = {f"images/{e.file_name}": e for e in entries}
    out = []
    for r in records:
        if r["qtype"] == "caption":
            continue
        e, (human, gpt) = by_image[r["image"]], r["conversations"]
        text = human["value"].split("\n", 1)[-1]  # the text after the <image> line
        out.append(Question(e.cocoid * 10 + QTYPES.index(r["qtype"]), e, r["qtype"], text, gpt["value"]))
    return out


def question_type(question: str) -> str:
    """VQAv2's question type: the longest listed opening of the question's words."""
    words = question.lower().rstrip("?").split()
    openings = (" ".join(words[:n]) for n in range(len(words), 0, -1))
    return next((t for t in openings if t in QUESTION_TYPES), "none of the above")


def vqav2_files(questions: list[Question]) -> dict[str, bytes | ImageEntry]:
    """Paths under vqav2/ → file bytes, or the entry whose image goes there."""
    head = {"info": INFO, "license": LICENSE, "data_subtype": SPLIT}
    asked = [{"image_id": q.entry.cocoid, "question": q.text, "question_id": q.id} for q in questions]
    answered = [
        {
            "question_id": q.id,
            "image_id": q.entry.cocoid,
            "question_type": question_type(q.text),
            "answer_type": ANSWER_TYPES.get(q.qtype, "other"),
            "multiple_choice_answer": q.answer,
            "answers": [
                {"answer": q.answer, "answer_confidence": "yes", "answer_id": i + 1} for i in range(ANSWERS)
            ],
            "shapes_qtype": q.qtype,
        }
        for q in questions
    ]
    files: dict[str, bytes | ImageEntry] = {
        f"v2_OpenEnded_mscoco_{SPLIT}_questions.json": json_bytes(
            {**head, "task_type": "Open-Ended", "data_type": "mscoco", "questions": asked}
        ),
        f"v2_mscoco_{SPLIT}_annotations.json": json_bytes(
            {**head, "data_type": "mscoco", "annotations": answered}
        ),
    }
    for q in questions:
        files[f"{SPLIT}/COCO_{SPLIT}_{q.entry.cocoid:012d}.jpg"] = q.entry
    return files

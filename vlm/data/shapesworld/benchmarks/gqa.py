"""GQA's balanced questions file (Hudson & Manning 2019) for the test split's VQA questions.

shapes_balanced_questions.json maps a question id to its record; images are images/<imageId>.jpg.
`types` files each question as GQA would (GQA asks no counting questions: ShapesWorld's count is
filed as a global query), and `detailed` keeps ShapesWorld's own question type. GQA's
consistency and distribution metrics read `entailed` and `groups`: no question here entails
another, and none is in a global answer group.
"""

from __future__ import annotations

import re

from ..writers import ImageEntry, json_bytes
from .vqa import SPLIT, Question

TYPES = {  # ShapesWorld question type -> GQA's (structural, semantic) type
    "color": ("query", "attr"),
    "shape": ("query", "attr"),
    "count": ("query", "global"),
    "position": ("choose", "rel"),
    "side": ("choose", "rel"),
    "exists": ("verify", "obj"),
}
PATTERNS = {  # what a full answer repeats from the question (questions.py's templates)
    "color": r"What color is the (\w+)\?",
    "shape": r"What shape is the (\w+) object\?",
    "count": r"How many shapes are there\?",
    "position": r"Is the (\w+ \w+) left or right of the (\w+ \w+)\?",
    "side": r"Is the (\w+ \w+) on the left or the right\?",
    "exists": r"Is there a (\w+ \w+)\?",
}


def full_answer(q: Question) -> str:
    """The answer as a sentence, as GQA's `fullAnswer` ("The shirt is blue.")."""
    m, a = re.fullmatch(PATTERNS[q.qtype], q.text), q.answer
    match q.qtype, (m.groups() if m else None):
        case "color", (shape,):
            return f"The {shape} is {a}."
        case "shape", (color,):
            return f"The {color} object is a {a}."
        case "count", ():
            return "There is 1 shape." if a == "1" else f"There are {a} shapes."
        case "position", (x, y):
            return f"The {x} is to the {a} of the {y}."
        case "side", (x,):
            return f"The {x} is on the {a}."
        case "exists", (x,):
            return f"Yes, there is a {x}." if a == "yes" else f"No, there is no {x}."
    raise ValueError(f"no GQA full answer for the {q.qtype} question {q.text!r}")


def gqa_files(questions: list[Question]) -> dict[str, bytes | ImageEntry]:
    """Paths under gqa/ → file bytes, or the entry whose image goes there."""
    records, files = {}, {}
    for q in questions:
        structural, semantic = TYPES[q.qtype]
        records[str(q.id)] = {
            "imageId": str(q.entry.cocoid),
            "question": q.text,
            "answer": q.answer,
            "fullAnswer": full_answer(q),
            "isBalanced": True,
            "types": {"structural": structural, "semantic": semantic, "detailed": q.qtype},
            "entailed": [],
            "equivalent": [str(q.id)],
            "groups": {"global": None, "local": None},
        }
        files[f"images/{q.entry.cocoid}.jpg"] = q.entry
    return {f"{SPLIT}_balanced_questions.json": json_bytes(records), **files}

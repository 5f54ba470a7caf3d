"""What a benchmark is here: a reader of its published files that lists the items to prompt, and
a scorer of its official definition.

Readers check the layout and every record they use as they read, so a folder in the wrong
shape stops at once with one line naming the file and what is wrong, not minutes into a run;
images are only named here and opened when the item is prompted.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

from vlm.data.readers import DataFormatError

SHORT_ANSWER = "\nAnswer the question using a single word or phrase."  # LLaVA-1.5's short-answer prompt


class BenchmarkError(DataFormatError):
    """A benchmark folder that is missing or in the wrong layout; the message is one line that
    names the file expected and what is wrong with it."""


@dataclass(frozen=True)
class Item:
    """One question about one image. ``id`` is unique in the benchmark; ``answer`` is the
    reference (one string, or every annotator's), None where the files hold none (test splits)."""

    id: str
    image_path: Path
    question: str
    answer: str | list[str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)


class Benchmark:
    """``items()`` to prompt, ``score(predictions)`` of the official definition (fractions in
    [0, 1] unless the benchmark defines other units) and, where its server takes one,
    ``submission(predictions)``: the upload file's records."""

    name: ClassVar[str]
    headline: ClassVar[tuple[str, ...]]  # the figures a results table shows (row.md)
    default_suffix: ClassVar[str] = SHORT_ANSWER

    def __init__(
        self,
        root: str | Path,
        split: str | None,
        image_folder: str | Path | None = None,
        prompt_suffix: str | None = None,
        limit: int | None = None,
    ):
        self.root = Path(root)
        self.split = split
        self.image_folder = Path(image_folder) if image_folder else None
        self.prompt_suffix = self.default_suffix if prompt_suffix is None else prompt_suffix
        self.limit = limit

    def items(self) -> list[Item]:
        """The first ``limit`` items (all without one), read once."""
        return self._items

    @cached_property
    def _items(self) -> list[Item]:
        if not self.root.is_dir():
            raise BenchmarkError(f"{self.name}: the benchmark folder {self.root} does not exist")
        return self.read()[: self.limit]

    def read(self) -> list[Item]:
        raise NotImplementedError

    def prompt(self, item: Item) -> str:
        """The human turn, as LLaVA-1.5 asks it: the image, the question, the suffix."""
        return f"<image>\n{item.question}{self.prompt_suffix}"

    def score(self, predictions: dict[str, str]) -> dict[str, float]:
        raise NotImplementedError

    def submission(self, predictions: dict[str, str]) -> list[dict] | None:
        return None

    def info(self) -> dict[str, Any]:
        """What the score file should say besides the figures."""
        return {}

    def answered(self, predictions: dict[str, str]) -> list[tuple[Item, str]]:
        """(item, prediction) for the items with a reference answer and a prediction: a skipped
        item is left out of the scores (the run reports how many were)."""
        return [
            (it, predictions[it.id]) for it in self.items() if it.answer is not None and it.id in predictions
        ]


def load_json(path: Path, what: str) -> Any:
    """The JSON in ``path`` (``what`` says which file it is, for the message)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise BenchmarkError(f"{path}: no such file (expected {what})") from None
    except json.JSONDecodeError as e:
        raise BenchmarkError(
            f"{path}: malformed JSON ({e.msg} at line {e.lineno} column {e.colno})"
        ) from None
    except UnicodeDecodeError as e:
        raise BenchmarkError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def records(data: Any, path: Path, key: str | None, fields: Iterable[str]) -> list[dict]:
    """``data[key]`` (``data`` itself without a key) as a list of objects that each have
    ``fields``; anything else is a :class:`BenchmarkError` naming the first record at fault."""
    if key is not None:
        if not isinstance(data, dict) or key not in data:
            raise BenchmarkError(f"{path}: expected a JSON object with a {key!r} list")
        data = data[key]
    where = f"{key!r}" if key else "the file"
    if not isinstance(data, list):
        raise BenchmarkError(f"{path}: expected {where} to be a JSON list, got a {type(data).__name__}")
    fields = list(fields)
    for i, rec in enumerate(data):
        missing = [f for f in fields if not isinstance(rec, dict) or f not in rec]
        if missing:
            raise BenchmarkError(f"{path}: record {i} of {where} has no {missing[0]!r}")
    return data


def answer_list(rec: dict, path: Path, i: int, key: str = "answer") -> list[str]:
    """The annotators' answers of a record whose ``answers`` are ``[{"answer": ...}, ...]``."""
    answers = rec["answers"]
    if not isinstance(answers, list) or not all(isinstance(a, dict) and key in a for a in answers):
        raise BenchmarkError(f"{path}: record {i}: 'answers' must be a list of {{{key!r}: ...}} objects")
    return [str(a[key]) for a in answers]


def accuracy_by_group(pairs: list[tuple[str, float]]) -> dict[str, float]:
    """``accuracy``, the mean over (group, value) pairs, and ``accuracy/<group>`` per group;
    {} when nothing was scored. "/" in a group name becomes "_" (VQAv2's "yes/no") so the key
    stays one level deep."""
    if not pairs:
        return {}
    groups: dict[str, list[float]] = defaultdict(list)
    for group, value in pairs:
        groups[str(group).replace("/", "_")].append(value)
    by_group = {f"accuracy/{g}": sum(v) / len(v) for g, v in sorted(groups.items())}
    return {"accuracy": sum(v for _, v in pairs) / len(pairs), **by_group}

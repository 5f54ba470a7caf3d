"""``ConversationDataset``: LLaVA-style records → samples, with a policy for bad samples.

Real instruction data has holes (LLaVA issues are full of missing COCO files, truncated
JPEGs, conversations that do not alternate). A bad sample either stops the run with a
message naming file, record and reason (``on_bad_sample="raise"``, for curating data) or
is skipped and counted (``"skip"``, for training), so a few broken records never cost a
run and never go unnoticed.

Record checks need no image IO and run once at construction (a JSONL line that is no record
arrives as a :class:`~vlm.data.readers.BadLine` and fails them too). Image errors can only be
seen when the image is read, in ``__getitem__``, and so can a transform's refusal (the
processor's :class:`SkipSample`: longer than ``max_length``, no target token left); the sample
is then ``None`` (the processor's collate drops it). Those are recorded per record in a
shared-memory tensor, so counts made inside DataLoader worker processes reach the main process
(per DDP rank). The first few skips of each reason are named in a WARNING.
"""

from __future__ import annotations

import copy
import logging
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from vlm.data.readers import BadLine

log = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"  # LLaVA JSON's image placeholder
ROLES = ("human", "gpt")  # turn 2k is human, 2k+1 gpt
# Reasons only seen when a sample is read: codes 1.. in the per-record tensor.
READ_REASONS = (
    "missing image",
    "unreadable image",
    "longer than max_length",
    "no target tokens left",
    "malformed mask",
)
NAMED_PER_REASON = 3  # skips of one reason named one by one (per process); the rest are counted
RECORD_KEYS = ("id", "image", "conversations")


class BadSampleError(ValueError):
    """A record cannot be used; the one-line message names file, index, id and reason."""


class SkipSample(ValueError):
    """A transform's verdict that a sample cannot be used (``reason``: one of ``READ_REASONS``);
    the dataset skips and counts it, or raises, as for any bad sample."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


def check_record(rec: Any, require_image: bool) -> tuple[str, str] | None:
    """(reason, detail) when the record cannot become a training sample, else None."""
    if isinstance(rec, BadLine):
        return rec.reason, rec.detail
    if not isinstance(rec, dict):
        return "malformed record", f"a JSON {type(rec).__name__}, not an object"
    if rec.get("image") is not None and not isinstance(rec["image"], str):
        return "malformed record", "'image' is not one path (multi-image records are not supported)"
    turns = rec.get("conversations")
    if not isinstance(turns, list) or not turns:
        return "malformed conversation", "no 'conversations' list"
    for i, t in enumerate(turns):
        role = t.get("from") if isinstance(t, dict) else None
        if role not in ROLES:
            return "malformed conversation", f"turn {i}: unknown role {role!r}"
        if role != ROLES[i % 2]:
            return "malformed conversation", f"turn {i}: {role!r} where {ROLES[i % 2]!r} was expected"
        if not isinstance(t.get("value"), str) or not t["value"].strip():
            return "malformed conversation", f"turn {i}: empty value"
    if len(turns) % 2:
        return "malformed conversation", "ends with a human turn (no answer)"
    n_image = sum(t["value"].count(IMAGE_TOKEN) for t in turns)
    if rec.get("image"):
        if IMAGE_TOKEN not in turns[0]["value"]:
            return "missing <image>", f"first human turn has no {IMAGE_TOKEN}"
        if n_image > 1:
            return "multiple <image>", f"{n_image} {IMAGE_TOKEN} placeholders for one image"
    elif require_image:
        return "no image", "record has no 'image' (pass require_image=False for text-only data)"
    elif n_image:
        return "<image> without image", f"{IMAGE_TOKEN} in a text-only record"
    return None


class ConversationDataset(Dataset):
    """Samples ``{"id", "image": PIL RGB | None, "conversations", "meta"}`` (or ``transform(sample)``).

    ``meta`` holds every record key besides id/image/conversations (ShapesWorld's ``qtype``,
    COCO's ``captions``). ``source`` names the records' file in messages. ``bad_samples``
    counts skipped records by reason; IO counts are per record, so an image that fails in
    every epoch, or in both validation loaders, counts once.
    """

    def __init__(
        self,
        records: Sequence[Any],
        image_root: str | Path,
        on_bad_sample: str = "skip",
        transform: Callable[[dict], Any] | None = None,
        require_image: bool = True,
        source: str = "<records>",
    ):
        if on_bad_sample not in ("skip", "raise"):
            raise ValueError(f"on_bad_sample must be 'skip' or 'raise', got {on_bad_sample!r}")
        self.records = records
        self.image_root = Path(image_root)
        self.on_bad_sample = on_bad_sample
        self.transform = transform
        self.source = source
        self.rejected: Counter[str] = Counter()
        self._named: Counter[str] = Counter()
        self.index: list[int] = []  # positions in `records` that passed the record checks
        for i, rec in enumerate(records):
            bad = check_record(rec, require_image)
            if bad is None:
                self.index.append(i)
                continue
            if on_bad_sample == "raise":
                raise BadSampleError(self._message(i, *bad))
            self.rejected[bad[0]] += 1
            self._name(i, *bad)
        self.read_failures = torch.zeros(len(records), dtype=torch.uint8).share_memory_()
        if self.rejected:
            log.warning(self.summary())

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, k: int) -> Any:
        i = self.index[k]
        rec = self.records[i]
        image = None
        if rec.get("image"):
            path = self.image_root / rec["image"]
            try:
                with Image.open(path) as im:
                    image = im.convert("RGB")
            except FileNotFoundError:
                return self._fail(i, "missing image", str(path))
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
                return self._fail(i, "unreadable image", f"{path}: {e}")
        sample = {
            "id": str(rec.get("id", i)),
            "image": image,
            "conversations": rec["conversations"],
            "meta": _meta(rec),
        }
        if self.transform is None:
            return sample
        try:
            return self.transform(sample)
        except SkipSample as e:
            return self._fail(i, e.reason, e.detail)

    def _fail(self, i: int, reason: str, detail: str) -> None:
        if self.on_bad_sample == "raise":
            raise BadSampleError(self._message(i, reason, detail))
        first = not self.read_failures[i]  # named once, however many epochs read it
        self.read_failures[i] = READ_REASONS.index(reason) + 1
        if first:
            self._name(i, reason, detail)
        return None

    def _name(self, i: int, reason: str, detail: str) -> None:
        """A WARNING naming the skipped record, for the first few of each reason."""
        self._named[reason] += 1
        if self._named[reason] <= NAMED_PER_REASON:
            log.warning(f"skipped {self._message(i, reason, detail)}")

    def _message(self, i: int, reason: str, detail: str) -> str:
        rec = self.records[i]
        rid = rec.get("id", "?") if isinstance(rec, dict) else "?"
        return f"{self.source} record {i} (id {rid}): {reason}: {detail}"

    @property
    def read_skipped(self) -> Counter[str]:
        """Records skipped when read so far (image faults, the transform's refusals), by reason."""
        codes = torch.bincount(self.read_failures.long(), minlength=len(READ_REASONS) + 1).tolist()
        return Counter({r: n for r, n in zip(READ_REASONS, codes[1:], strict=True) if n})

    @property
    def bad_samples(self) -> Counter[str]:
        """Skipped records by reason: rejected at construction + skipped when read so far."""
        return self.rejected + self.read_skipped

    def summary(self) -> str:
        """E.g. "skipped 3/1000 samples from llava_train.json: 2 missing image, 1 malformed conversation"."""
        bad = self.bad_samples
        parts = ", ".join(f"{n} {r}" for r, n in bad.most_common())
        return f"skipped {sum(bad.values())}/{len(self.records)} samples from {self.source}" + (
            f": {parts}" if parts else ""
        )

    def conversations(self) -> Iterator[list[dict]]:
        """Conversations of the records that passed the checks; no image IO."""
        for i in self.index:
            yield self.records[i]["conversations"]

    def text_samples(self) -> Iterator[dict]:
        """The samples without their images (``conversations`` and ``meta``): what encoding
        the text needs, read with no image IO."""
        for i in self.index:
            rec = self.records[i]
            yield {"conversations": rec["conversations"], "meta": _meta(rec)}

    def with_transform(self, transform: Callable[[dict], Any] | None) -> ConversationDataset:
        """A view with another transform that shares records, index and bad-sample counts
        (the validation split feeds a loss loader and a generation loader)."""
        view = copy.copy(self)
        view.transform = transform
        return view

    def subset(self, positions: Sequence[int]) -> ConversationDataset:
        """A view over ``positions`` (indices into this dataset), sharing the counts."""
        view = copy.copy(self)
        view.index = [self.index[k] for k in positions]
        return view


def _meta(rec: dict) -> dict:
    """Every record key besides id, image and conversations."""
    return {k: v for k, v in rec.items() if k not in RECORD_KEYS}

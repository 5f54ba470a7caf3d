"""Readers for the published formats: LLaVA JSON and COCO captions (+ the Karpathy split).

They return plain record dicts and check only the file-level format; per-record checks
(conversation shape, ``<image>`` placement, image files) belong to ``ConversationDataset``,
which can skip a bad record instead of losing the whole file.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PathLike = str | Path

# Karpathy's "restval" (the 30k val2014 images outside his val/test) is training data.
KARPATHY_SPLITS = {"train": ("train", "restval"), "val": ("val",), "test": ("test",)}


class DataFormatError(ValueError):
    """A data file is not in the format its reader expects; the message is one line."""


@dataclass(frozen=True)
class BadLine:
    """A JSONL line that is no record (not UTF-8, or not JSON); it stands in the record list
    so that the dataset's ``on_bad_sample`` policy skips and counts it, or raises naming it."""

    reason: str
    detail: str


def _load_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataFormatError(
            f"malformed JSON in {path}: {e.msg} at line {e.lineno} column {e.colno} (char {e.pos})"
        ) from None
    except UnicodeDecodeError as e:
        raise DataFormatError(f"{path} is not UTF-8 text: {e.reason} at byte {e.start}") from None


def _load_jsonl(path: Path) -> list[Any]:
    """One record per non-empty line; a line that is no record becomes a :class:`BadLine`."""
    records: list[Any] = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                detail = f"line {lineno}: not UTF-8 ({e.reason} at byte {e.start})"
                records.append(BadLine("undecodable line", detail))
                continue
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                records.append(BadLine("malformed JSON line", f"line {lineno}: {e.msg} at column {e.colno}"))
    return records


def read_llava_json(path: PathLike | Sequence[PathLike]) -> list[dict]:
    """LLaVA-1.5 / LCS-558K / mix665k / ShareGPT4V: a JSON list of ``{"id", "image"?,
    "conversations": [{"from": "human"|"gpt", "value"}, ...]}``; extra keys are kept. A
    ``.jsonl`` file holds one such record per line (Cambrian-737k ships that way). Several
    files (a data mix) are read in order into one list."""
    if not isinstance(path, (str, Path)):
        return [r for p in path for r in read_llava_json(p)]
    path = Path(path)
    data = _load_jsonl(path) if path.suffix == ".jsonl" else _load_json(path)
    if not isinstance(data, list):
        raise DataFormatError(f"{path}: expected a JSON list of records, got a JSON {type(data).__name__}")
    return data


def read_coco_captions(
    annotations_json: PathLike | Sequence[PathLike],
    karpathy_split_json: PathLike | None = None,
    split: str | None = None,
) -> list[dict]:
    """One record ``{"id", "image", "captions"}`` per image.

    Without a Karpathy file: every image of the annotation file(s), ``image`` = COCO
    ``file_name``. With one: the images of ``split`` (train = train + restval), ``image`` =
    ``filepath/filename`` as Karpathy writes it (relative to the folder holding train2014/
    and val2014/); captions still come from the COCO annotations, so pass every annotation
    file the split draws from (Karpathy's val/test are cut from val2014).
    """
    paths = (
        [Path(annotations_json)]
        if isinstance(annotations_json, (str, Path))
        else [Path(p) for p in annotations_json]
    )
    images: dict[int, str] = {}
    caps: dict[int, list[str]] = {}
    for path in paths:
        coco = _load_json(path)
        if not isinstance(coco, dict) or "images" not in coco or "annotations" not in coco:
            raise DataFormatError(f"{path}: not a COCO captions file (needs 'images' and 'annotations')")
        images.update({im["id"]: im["file_name"] for im in coco["images"]})
        for ann in coco["annotations"]:
            caps.setdefault(ann["image_id"], []).append(ann["caption"].strip())
    names = ", ".join(p.name for p in paths)
    if karpathy_split_json is None:
        if split is not None:
            raise ValueError(f"split={split!r} needs karpathy_split_json (COCO files carry no split)")
        return [{"id": str(i), "image": f, "captions": caps.get(i, [])} for i, f in images.items()]
    if split not in KARPATHY_SPLITS:
        raise ValueError(f"split must be one of {list(KARPATHY_SPLITS)}, got {split!r}")
    karpathy = _load_json(Path(karpathy_split_json))
    chosen = [im for im in karpathy["images"] if im["split"] in KARPATHY_SPLITS[split]]
    lacking = [im["cocoid"] for im in chosen if im["cocoid"] not in caps]
    if lacking:
        raise DataFormatError(
            f"{len(lacking)} images of Karpathy split '{split}' have no captions in {names} "
            f"(e.g. cocoid {lacking[0]}): pass every COCO captions file the split draws from"
        )
    return [
        {
            "id": str(im["cocoid"]),
            "image": f"{im['filepath']}/{im['filename']}",
            "captions": caps[im["cocoid"]],
        }
        for im in chosen
    ]


def caption_conversations(records: list[dict], per_caption: bool) -> list[dict]:
    """Caption records as LLaVA ``plain``-template conversations (human ``<image>``, gpt caption).

    ``per_caption``: one record per caption (training sees every caption); otherwise one per
    image with the first caption as the answer and all of them in ``captions`` (BLEU/CIDEr
    score against every reference).
    """
    out = []
    for r in records:
        extra = {k: v for k, v in r.items() if k not in ("id", "image", "captions")}
        chosen = (
            list(enumerate(r["captions"]))
            if per_caption
            else [(0, r["captions"][0] if r["captions"] else "")]
        )
        for k, caption in chosen:
            rec = {
                "id": f"{r['id']}_{k}" if per_caption else r["id"],
                "image": r["image"],
                "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": caption}],
                "qtype": "caption",
                **extra,
            }
            if not per_caption:
                rec["captions"] = r["captions"]
            out.append(rec)
    return out

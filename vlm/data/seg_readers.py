"""Readers for referring and reasoning segmentation: refCOCO/refCOCO+/refCOCOg and ReasonSeg.

Each returns LLaVA-style records that ``ConversationDataset`` takes as they are; the keys
past id/image/conversations reach ``sample["meta"]``, and ``vlm.data.masks.target_masks``
rasterises them::

    {"id", "image": path under the image folder,
     "conversations": [{"from": "human", "value": "<image>\\n" + question},
                       {"from": "gpt", "value": answer}],  # one [SEG] per mask
     "qtype": expression type, "masks": [COCO segmentation, ...], "ignore": [...],
     "height", "width"}  # of the original image

One record per expression (refCOCO: every sentence of every ref; ReasonSeg: every text of an
image). The default phrasing is LISA's (Lai et al. 2024, utils/utils.py and dataset.py).
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

from PIL import Image

from vlm.data.datasets import IMAGE_TOKEN
from vlm.data.readers import BadLine, DataFormatError, PathLike, _load_json

SEG_TOKEN = "[SEG]"
QUESTION = "Please segment {expr}."
SENTENCE_QUESTION = "{sentence} Please output the segmentation mask."
ANSWER = "It is [SEG]."


class _NoGlobals(pickle.Unpickler):
    """Refuses every global: a refs pickle is lists, dicts, strings and numbers, so needs none,
    and a crafted file (``__reduce__`` calling ``os.system``) cannot run anything."""

    def __init__(self, file: Any, path: Path) -> None:
        super().__init__(file, encoding="utf-8")  # Python 2 ``str`` arrives as text
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        raise DataFormatError(f"{self.path}: refused to load {module}.{name} (a refs pickle needs no code)")


def load_refs(path: PathLike) -> list[dict]:
    """The refs list of a published ``refs(<split_by>).p`` (written by Python 2), loaded safely."""
    path = Path(path)
    with open(path, "rb") as f:
        try:
            refs = _NoGlobals(f, path).load()
        except DataFormatError:
            raise
        except Exception as e:  # a corrupt pickle fails in many ways; all mean the same here
            raise DataFormatError(f"{path}: not a refs pickle ({type(e).__name__}: {e})") from None
    if not isinstance(refs, list) or not all(isinstance(r, dict) for r in refs):
        raise DataFormatError(f"{path}: expected a list of refs (dicts), got a {type(refs).__name__}")
    return refs


def _check_answer(answer: str) -> None:
    if answer.count(SEG_TOKEN) != 1:
        raise ValueError(f"answer template {answer!r} must hold exactly one {SEG_TOKEN} (one mask)")


def _record(rid: str, image: str, question: str, answer: str, qtype: str, **masks: Any) -> dict:
    human = {"from": "human", "value": f"{IMAGE_TOKEN}\n{question}"}
    turns = [human, {"from": "gpt", "value": answer}]
    return {"id": rid, "image": image, "conversations": turns, "qtype": qtype, **masks}


def read_refcoco(
    folder: PathLike, split: str, split_by: str = "unc", question: str = QUESTION, answer: str = ANSWER
) -> list[dict]:
    """refCOCO / refCOCO+ (``split_by="unc"``: train, val, testA, testB) and refCOCOg (``umd``:
    train, val, test), as published: ``<folder>/instances.json`` (COCO instances) and
    ``<folder>/refs(<split_by>).p``. ``image`` is the instance file's ``file_name`` (the ref's own
    carries an annotation suffix, ``..._16.jpg``, and names no file). ``qtype`` is the
    sentence's ``type`` where it has one (ShapesWorld's), else ``refcoco``. ``question`` fills
    ``{expr}`` with the sentence."""
    folder = Path(folder)
    _check_answer(answer)
    path = folder / f"refs({split_by}).p"
    refs = load_refs(path)
    present = sorted({str(r.get("split")) for r in refs})
    if split not in present:
        raise DataFormatError(f"{path}: no split {split!r}; the refs hold {', '.join(present)}")
    coco = _load_json(folder / "instances.json")
    if not isinstance(coco, dict) or "images" not in coco or "annotations" not in coco:
        raise DataFormatError(f"{folder / 'instances.json'}: not a COCO instances file")
    images = {im["id"]: im for im in coco["images"]}
    anns = {a["id"]: a for a in coco["annotations"]}
    records = []
    for i, ref in enumerate(r for r in refs if r["split"] == split):
        try:
            im, ann = images[ref["image_id"]], anns[ref["ann_id"]]
            for sent in ref["sentences"]:
                records.append(
                    _record(
                        f"{ref['ref_id']}_{sent['sent_id']}",
                        im["file_name"],
                        question.format(expr=sent["sent"].strip()),
                        answer,
                        sent.get("type", "refcoco"),
                        masks=[ann["segmentation"]],
                        ignore=[],
                        height=im["height"],
                        width=im["width"],
                    )
                )
        except (KeyError, TypeError, AttributeError) as e:
            raise DataFormatError(f"{path}: ref {i} of split {split!r} does not resolve ({e!r})") from None
    return records


def read_reasonseg(
    folder: PathLike,
    split: str,
    question: str = QUESTION,
    sentence_question: str = SENTENCE_QUESTION,
    answer: str = ANSWER,
) -> list[Any]:
    """ReasonSeg as published: ``<folder>/<split>/<name>.jpg`` + ``<name>.json`` holding
    ``{"text": [...], "is_sentence", "shapes": [{"label", "points": [[x, y], ...]}, ...]}``.

    As LISA's ``get_mask_from_json``: shapes labelled ``flag`` are dropped, a label holding
    ``ignore`` is an ignored region (255), every other shape is part of the ONE target (one
    [SEG]). A sentence (``is_sentence``) is asked with ``sentence_question`` (``{sentence}``),
    a phrase with ``question`` (``{expr}``); ``qtype`` is ``long_query`` or ``short_query``, the
    columns of LISA's Table 1. ``height``/``width`` come from the image header. An image whose
    JSON is missing, does not parse or is no annotation is one :class:`BadLine` (the dataset
    skips and counts it, or raises), as a bad JSONL line is."""
    _check_answer(answer)
    root = Path(folder) / split
    if not root.is_dir():
        present = (
            sorted(p.name for p in Path(folder).iterdir() if p.is_dir()) if Path(folder).is_dir() else []
        )
        raise DataFormatError(f"{root}: no ReasonSeg split {split!r}; {folder} holds {present or 'no split'}")
    records: list[Any] = []
    for image in sorted(root.glob("*.jpg")):
        ann = _annotation(image.with_suffix(".json"))
        if isinstance(ann, BadLine):
            records.append(ann)
            continue
        try:
            with Image.open(image) as im:  # reads the header only
                width, height = im.size
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            records.append(BadLine("unreadable image", f"{image}: {e}"))
            continue
        target, ignore = [], []
        for shape in ann["shapes"]:
            label = shape["label"].lower()
            if label != "flag":
                (ignore if "ignore" in label else target).append([v for xy in shape["points"] for v in xy])
        template = sentence_question if ann["is_sentence"] else question
        qtype = "long_query" if ann["is_sentence"] else "short_query"
        for j, text in enumerate(ann["text"]):
            records.append(
                _record(
                    f"{image.stem}_{j}",
                    f"{split}/{image.name}",
                    template.format(sentence=text.strip(), expr=text.strip()),
                    answer,
                    qtype,
                    masks=[target],
                    ignore=[[poly] for poly in ignore],
                    height=height,
                    width=width,
                )
            )
    return records


def _annotation(path: Path) -> dict | BadLine:
    """A ReasonSeg JSON, checked, or the :class:`BadLine` saying why not. UTF-8, else cp1252:
    some published files are (LISA reads both)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return BadLine("malformed annotation", f"{path}: no such file")
    try:
        try:
            ann = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            ann = json.loads(raw.decode("cp1252"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return BadLine("malformed JSON", f"{path}: {e}")
    shapes = ann.get("shapes") if isinstance(ann, dict) else None
    ok = (
        isinstance(shapes, list)
        and isinstance(ann.get("text"), list)
        and all(isinstance(t, str) for t in ann["text"])
        and isinstance(ann.get("is_sentence"), bool)
        and all(
            isinstance(s, dict)
            and isinstance(s.get("label"), str)
            and isinstance(s.get("points"), list)
            and all(isinstance(xy, list) for xy in s["points"])
            for s in shapes
        )
    )
    if not ok:
        shape = '{"text": [str], "is_sentence": bool, "shapes": [{"label": str, "points": [[x, y], ...]}]}'
        return BadLine("malformed annotation", f"{path}: expected {shape}")
    return ann

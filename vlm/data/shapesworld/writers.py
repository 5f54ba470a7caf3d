"""Atomic file writes and the published formats ShapesWorld emits.

COCO captions + Karpathy split, COCO instances + refCOCO refs: the same
structures the real datasets ship, so the real readers are what reads them.
"""

from __future__ import annotations

import io
import json
import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from .questions import referring_expressions
from .scene import Shape


@dataclass
class ImageEntry:
    """One generated image: `file_name` is relative to the `images/` folder."""

    id: str
    cocoid: int
    split: str
    file_name: str
    size: int
    scene: list[Shape]
    captions: list[str]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a unique temp file beside `path`, then rename: readers never see half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, json_bytes(obj))


def png_bytes(img: Image.Image) -> bytes:
    """PNG at compression level 1: the files are tiny anyway and encoding dominates generation time."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def jpeg_bytes(img: Image.Image) -> bytes:
    """JPEG at quality 95 without chroma subsampling: with PIL's default 4:2:0 the colour of a
    64 px scene's shape edges shifts by up to 126/255; 4:4:4 keeps every shape pixel nearest
    its own palette colour (the benchmarks' published images are JPEG)."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95, subsampling=0)
    return buf.getvalue()


def tokens(sentence: str) -> list[str]:
    """Karpathy-style tokens: lower-case words, punctuation dropped."""
    return re.findall(r"[a-z0-9]+", sentence.lower())


def _image(e: ImageEntry) -> dict:
    return {"id": e.cocoid, "file_name": e.file_name, "width": e.size, "height": e.size}


def coco_captions(entries: list[ImageEntry]) -> dict:
    anns = [{"image_id": e.cocoid, "caption": c} for e in entries for c in e.captions]
    return {
        "info": {"description": "ShapesWorld captions (COCO format)"},
        "images": [_image(e) for e in entries],
        "annotations": [{"id": i, **a} for i, a in enumerate(anns)],
    }


def karpathy(entries: list[ImageEntry]) -> dict:
    images, sent_id = [], 0
    for imgid, e in enumerate(entries):
        folder, filename = e.file_name.split("/")
        sents = []
        for c in e.captions:
            sents.append({"raw": c, "tokens": tokens(c), "imgid": imgid, "sentid": sent_id})
            sent_id += 1
        images.append(
            {
                "filepath": folder,
                "filename": filename,
                "imgid": imgid,
                "split": e.split,
                "cocoid": e.cocoid,
                "sentids": [s["sentid"] for s in sents],
                "sentences": sents,
            }
        )
    return {"dataset": "shapesworld", "images": images}


def instances_and_refs(entries: list[ImageEntry], shapes: list[str]) -> tuple[dict, list[dict]]:
    """COCO instances (polygon masks; colour as an extra attribute) and refCOCO refs, whose
    sentences carry their expression type as an extra key ``type``."""
    cat_id = {k: i + 1 for i, k in enumerate(shapes)}
    anns, refs, sent_id = [], [], 0
    for e in entries:
        for s in e.scene:
            ann_id = len(anns)
            anns.append(
                {
                    "id": ann_id,
                    "image_id": e.cocoid,
                    "category_id": cat_id[s.shape],
                    "segmentation": [[v for xy in s.polygon for v in xy]],
                    "bbox": s.bbox,
                    "area": s.area,
                    "iscrowd": 0,
                    "color": s.color,
                }
            )
            exprs = referring_expressions(s, e.scene)
            if not exprs:
                continue
            sents = [
                {"sent": x, "raw": x, "tokens": tokens(x), "sent_id": sent_id + j, "type": kind}
                for j, (kind, x) in enumerate(exprs)
            ]
            sent_id += len(sents)
            refs.append(
                {
                    "ref_id": len(refs),
                    "ann_id": ann_id,
                    "image_id": e.cocoid,
                    "split": e.split,
                    "category_id": cat_id[s.shape],
                    "file_name": e.file_name,
                    "sentences": sents,
                    "sent_ids": [x["sent_id"] for x in sents],
                }
            )
    instances = {
        "info": {"description": "ShapesWorld instances (COCO format)"},
        "images": [_image(e) for e in entries],
        "annotations": anns,
        "categories": [{"id": i, "name": k, "supercategory": "shape"} for k, i in cat_id.items()],
    }
    return instances, refs

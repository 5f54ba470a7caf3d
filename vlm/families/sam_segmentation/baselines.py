"""What a segmenter must beat, measured on the same split through the same metric: the empty
mask (every prediction empty) and the largest object (each expression answered with the
biggest annotated object of its image, a prior that knows objects but not language). Only
refCOCO-format data (ShapesWorld's refs, refCOCO/+/g) has the image's other objects.
``vlm-baselines`` runs it on a config's split.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vlm.core.seg_metrics import SegmentationIoU
from vlm.data.masks import target_masks
from vlm.data.readers import _load_json

BASELINES = ("empty", "largest")


def largest_objects(instances_json: Path) -> dict[str, list]:
    """Image file name -> the segmentation of its largest annotation (by COCO ``area``)."""
    coco = _load_json(instances_json)
    names = {im["id"]: im["file_name"] for im in coco["images"]}
    best: dict[str, tuple[float, list]] = {}
    for ann in coco["annotations"]:
        name = names[ann["image_id"]]
        if ann["area"] > best.get(name, (-1.0, None))[0]:
            best[name] = (ann["area"], ann["segmentation"])
    return {name: seg for name, (_, seg) in best.items()}


def score(records: list[dict], largest: dict[str, list], size: int, qtypes: list[str]) -> dict[str, dict]:
    """Each baseline's gIoU / cIoU (and per type) over ``records``, masks at ``size``."""
    metrics = {b: SegmentationIoU(qtypes) for b in BASELINES}
    for rec in records:
        target = target_masks(rec, size)
        scale = torch.full((len(target),), rec["height"] * rec["width"] / size**2)
        qtype = [rec.get("qtype", "referring")] * len(target)
        metrics["empty"].update(torch.zeros_like(target, dtype=torch.bool), target, qtype, scale)
        guess = target_masks({**rec, "masks": [largest[rec["image"]]] * len(target)}, size) == 1
        metrics["largest"].update(guess, target, qtype, scale)
    return {b: {k: round(float(v), 4) for k, v in m.compute().items()} for b, m in metrics.items()}

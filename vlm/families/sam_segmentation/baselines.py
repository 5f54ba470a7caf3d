"""What a segmenter must beat, measured on the same split through the same metric: the empty
mask (every prediction empty) and the largest object (each expression answered with the
biggest annotated object of its image, a prior that knows objects but not language).

    python -m vlm.families.sam_segmentation.baselines experiment=sam_shapes [split=test]

prints gIoU / cIoU overall and per expression type and writes them as JSON beside the data.
Only refCOCO-format data (ShapesWorld's refs, refCOCO/+/g) has the image's other objects.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import hydra
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from vlm.cli.common import CONFIG_DIR
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


def main(argv: list[str] | None = None) -> dict[str, dict]:
    args = list(sys.argv[1:] if argv is None else argv)
    split = next((a.split("=", 1)[1] for a in args if a.startswith("split=")), "test")
    size = int(next((a.split("=", 1)[1] for a in args if a.startswith("mask_size=")), 64))
    overrides = [a for a in args if not a.startswith(("split=", "mask_size="))]
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    data = hydra.utils.instantiate(cfg.data)
    data.prepare_data()
    instances = data._seg_folder() / "instances.json"
    if not instances.is_file():
        raise SystemExit(f"baselines need refCOCO-format data: {instances} does not exist")
    data.setup({"train": "fit", "val": "validate", "test": "test"}[split])
    dataset = data.datasets[split]
    records = [dataset.records[i] for i in dataset.index]
    largest = largest_objects(instances)
    result = score(records, largest, size, list(OmegaConf.to_container(cfg.data.qtypes)))
    counts = defaultdict(int)
    for rec in records:
        counts[rec.get("qtype", "referring")] += 1
    out = {"split": split, "records": len(records), "per_type": dict(counts), "mask_size": size, **result}
    path = Path(data.hparams.root) / f"baselines_{split}.json"
    path.write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()

"""``vlm-baselines``: the segmentation baselines (empty mask, largest object) on a config's split.

    vlm-baselines experiment=sam_shapes [split=test] [mask_size=64]

Prints gIoU / cIoU overall and per expression type, and writes them as JSON beside the data
(``<data.root>/baselines_<split>.json``).
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import hydra
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from vlm.cli.common import CONFIG_DIR
from vlm.families.sam_segmentation.baselines import largest_objects, score

STAGES = {"train": "fit", "val": "validate", "test": "test"}


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    opts = dict(a.split("=", 1) for a in args if a.startswith(("split=", "mask_size=")))
    split, size = opts.get("split", "test"), int(opts.get("mask_size", 64))
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        overrides = [a for a in args if not a.startswith(("split=", "mask_size="))]
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # paths resolve as in a run (${hydra:runtime.cwd})
    data = hydra.utils.instantiate(cfg.data)
    data.prepare_data()
    instances = data.seg_folder() / "instances.json"
    if not instances.is_file():
        raise SystemExit(f"vlm-baselines: refCOCO-format data needed, {instances} does not exist")
    data.setup(STAGES[split])
    dataset = data.datasets[split]
    records = [dataset.records[i] for i in dataset.index]
    qtypes = list(OmegaConf.to_container(cfg.data.qtypes))
    result = score(records, largest_objects(instances), size, qtypes)
    per_type = Counter(r.get("qtype", "referring") for r in records)
    out = {"split": split, "records": len(records), "per_type": dict(per_type), "mask_size": size, **result}
    (Path(data.hparams.root) / f"baselines_{split}.json").write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

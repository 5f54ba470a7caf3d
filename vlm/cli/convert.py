"""``vlm-convert ckpt=<old.ckpt> out=<new.ckpt>``: a checkpoint of an earlier vlm-lab release as
one this release reads, once.

Checkpoints are read weights-only, so that a file from elsewhere cannot run code; those of the
earlier releases held config objects (OmegaConf nodes) that only a full unpickling reads, and
named one LightningModule per family. This command is the one place that unpickles fully: give
it only checkpoints you trust (your own runs). What it writes holds tensors and plain values,
names the shared LightningModule and the family's model class, and carries the objective that
the old ``qtypes`` implied; the weights are copied unchanged. The new file is written beside its
final name and renamed into place, then read back weights-only and rebuilt, so a conversion
that would not load fails here, not later.
"""

from __future__ import annotations

import os
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from vlm.cli.common import CONFIG_DIR
from vlm.core.checkpoint import FORMAT, plain
from vlm.core.lit_module import VLMLitModule

CORE = "vlm.core.lit_module.VLMLitModule"
CAPTIONER = "vlm.families.qformer_captioner.module.CaptionerModule"
F = "vlm.families"
# format 1: module class -> (the module class now, the family's model class)
FORMAT_1 = {
    f"{F}.llava.module.LlavaModule": (CORE, "vlm.core.llava.LlavaModel"),
    f"{F}.calm.module.CalmModule": (CORE, f"{F}.calm.model.CalmModel"),
    f"{F}.layer_fusion.module.LayerFusionModule": (CORE, f"{F}.layer_fusion.model.LayerFusionModel"),
    CAPTIONER: (CAPTIONER, f"{F}.qformer_captioner.model.QFormerCaptioner"),
}


def upgrade(ckpt: dict) -> dict:
    """The checkpoint in this release's format (plain values; format-1 names and arguments mapped)."""
    ckpt = plain(ckpt)
    extra = ckpt.get("vlm")
    if not isinstance(extra, dict):
        raise SystemExit("not a vlm-lab checkpoint: it has no 'vlm' entry (tokenizer and model config)")
    if extra.get("format", 1) == 1:
        if extra["module"] not in FORMAT_1:
            raise SystemExit(f"format-1 checkpoint of an unknown module {extra['module']!r}")
        module, model = FORMAT_1[extra["module"]]
        hp = ckpt["hyper_parameters"]
        qtypes = hp.pop("qtypes", None) or []
        hp.pop("frozen_dtype", None)  # a run-time setting now (stage.frozen_dtype)
        hp["model"] = {"_target_": model, **hp["model"]}
        if module == CAPTIONER:
            hp["objective"] = {"_target_": "vlm.core.objectives.CaptionObjective"}
        else:
            hp["objective"] = {"_target_": "vlm.core.objectives.VQAObjective", "qtypes": qtypes}
        for data in (extra.get("data"), ckpt.get("datamodule_hyper_parameters")):
            if isinstance(data, dict):
                data.setdefault("qtypes", qtypes)
        extra["module"] = module
    extra["format"] = FORMAT
    return ckpt


def convert(src: Path, out: Path) -> None:
    ckpt = torch.load(src, map_location="cpu", weights_only=False)  # trusted input only: see above
    new = upgrade(ckpt)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        torch.save(new, tmp)
        VLMLitModule.from_checkpoint(tmp)  # weights-only, and it builds
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="convert")
def main(cfg: DictConfig) -> None:
    if not cfg.ckpt or not cfg.out:
        raise SystemExit("usage: vlm-convert ckpt=<old.ckpt> out=<new.ckpt>  (only checkpoints you trust)")
    src, out = Path(cfg.ckpt), Path(cfg.out)
    if not src.is_file():
        raise SystemExit(f"checkpoint {src} does not exist")
    convert(src, out)
    print(f"converted {src} -> {out} (format {FORMAT})")


if __name__ == "__main__":
    main()

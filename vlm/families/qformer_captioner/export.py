"""A ``save_pretrained``-style folder for a trained captioner, and its loader.

    <dir>/config.json                 the module class and its hyper-parameters
    <dir>/vision_tower.safetensors    one file per part, as the parameter table names them
    <dir>/qformer.safetensors
    <dir>/conditioning.safetensors
    <dir>/decoder.safetensors
    <dir>/tokenizer/                  the tokenizer's own save_pretrained files

The folder is written beside its final name and renamed into place, so an interrupted export
never leaves a half-written model under that name.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors.torch import load_model, save_model
from transformers import AutoTokenizer

from vlm.core.checkpoint import rebuild_hparams
from vlm.core.classes import known_class
from vlm.core.lit_module import VLMLitModule

FORMAT = "vlm-lab/qformer_captioner/2"  # 2: hyper-parameters of checkpoint format 2


def save_pretrained(module, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    parts = module.model.parts()
    for name, part in parts.items():
        save_model(part, str(tmp / f"{name}.safetensors"))  # shared (tied) tensors stored once
    module.tokenizer.save_pretrained(tmp / "tokenizer")
    hp = rebuild_hparams(module.hparams)
    config = {
        "format": FORMAT,
        "module": f"{type(module).__module__}.{type(module).__qualname__}",
        "parts": {name: f"{name}.safetensors" for name in parts},
        "hyper_parameters": hp,
        "data": module.data_config,
    }
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def load_pretrained(path: str | Path, device: str = "cpu"):
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} is not an exported captioner: no config.json")
    config = json.loads(config_file.read_text())
    if config.get("format") != FORMAT:
        raise ValueError(f"{config_file}: format {config.get('format')!r}, expected {FORMAT!r}")
    tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer")
    target = known_class(config["module"], VLMLitModule, f"{config_file}'s module")
    module = target(**config["hyper_parameters"], tokenizer=tokenizer)
    parts = module.model.parts()
    for name, file in config["parts"].items():
        load_model(parts[name], str(path / file), strict=True, device=device)
    module.data_config = config.get("data")
    return module.eval()

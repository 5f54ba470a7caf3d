"""Self-contained checkpoints: a ``.ckpt`` carries the tokenizer, the data config and the
hyper-parameters (plain config values, never modules), so a run trained with an in-process
tokenizer is rebuilt and queried from the file alone, with no hub access.

    ckpt["vlm"] = {"format": 2, "module": "<LightningModule class>", "tokenizer": {file: text},
                   "data": <data config>}
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.rank_zero import rank_zero_info
from omegaconf import DictConfig, ListConfig, OmegaConf
from transformers import AutoTokenizer

from vlm.core.builder import target_class

FORMAT = 2  # 2: family.model names its model class; the objective is a hyper-parameter


def plain(value: Any) -> Any:
    """Config nodes and dataclasses (a stage's ``PartTune``) as plain JSON values."""
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def without_pretrained(cfg: Any) -> Any:
    """The checkpoint holds every weight, so rebuilding must not fetch hub weights again."""
    if isinstance(cfg, dict):
        return {k: (False if k == "pretrained" else without_pretrained(v)) for k, v in cfg.items()}
    return cfg


def rebuild_hparams(hparams: dict) -> dict:
    """A stored module's constructor arguments, to build it again offline."""
    return without_pretrained(plain(dict(hparams)) | {"init_from": None})


def payload(module: Any) -> dict:
    """What ``on_save_checkpoint`` adds under ``"vlm"``."""
    return {
        "format": FORMAT,
        "module": f"{type(module).__module__}.{type(module).__qualname__}",
        "tokenizer": tokenizer_to_dict(module.tokenizer),
        "data": module.data_config,
    }


def read_checkpoint(path: str | Path, map_location: str = "cpu", mmap: bool = False) -> dict:
    ckpt = torch.load(path, map_location=map_location, weights_only=False, mmap=mmap)
    extra = ckpt.get("vlm") if isinstance(ckpt, dict) else None
    if extra is None:
        raise ValueError(f"{path} has no tokenizer and model config: not a vlm-lab checkpoint")
    if extra.get("format") != FORMAT:
        raise ValueError(
            f"{path} is a vlm-lab checkpoint of format {extra.get('format', 1)}, this version reads "
            f"format {FORMAT}: train it again, or read it with the release that wrote it"
        )
    return ckpt


def load_module(path: str | Path, base: type, map_location: str = "cpu"):
    """The LightningModule a checkpoint holds (its class must be a ``base``), in eval mode."""
    ckpt = read_checkpoint(path, map_location)
    target = target_class(ckpt["vlm"]["module"], base, "the checkpoint's module")
    tokenizer = tokenizer_from_dict(ckpt["vlm"]["tokenizer"])
    module = target(**rebuild_hparams(ckpt["hyper_parameters"]), tokenizer=tokenizer)
    module.load_state_dict(ckpt["state_dict"])
    module.data_config = ckpt["vlm"].get("data")
    return module.eval()


def checkpoint_tokenizer(path: str | Path):
    """The tokenizer stored in one of our checkpoints."""
    return tokenizer_from_dict(read_checkpoint(path, mmap=True)["vlm"]["tokenizer"])


def load_matching(module: torch.nn.Module, path: str | Path) -> None:
    """Initialise from an earlier stage's checkpoint (stage 2 from stage 1): every tensor whose
    name and shape match is copied; the counts are said so a wrong file shows."""
    state = read_checkpoint(path)["state_dict"]
    own = module.state_dict()
    match = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    module.load_state_dict(match, strict=False)
    rank_zero_info(
        f"init_from {path}: loaded {len(match)}/{len(own)} tensors ({len(state) - len(match)} skipped)"
    )


def tokenizer_to_dict(tokenizer) -> dict[str, str]:
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return {p.name: p.read_text() for p in Path(tmp).iterdir() if p.is_file()}


def tokenizer_from_dict(files: dict[str, str]):
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in files.items():
            (Path(tmp) / name).write_text(text)
        return AutoTokenizer.from_pretrained(tmp)

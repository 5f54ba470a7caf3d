"""Self-contained checkpoints: a ``.ckpt`` carries the tokenizer, the data config and the
hyper-parameters, so a run trained with an in-process tokenizer is rebuilt and queried from the
file alone, with no hub access.

    ckpt["vlm"] = {"format": 2, "module": "<LightningModule class>", "tokenizer": {file: text},
                   "data": <data config>}

Everything in it is a tensor, a string, a number or a plain list/dict, so every checkpoint is
read with ``torch.load(weights_only=True)``: a file from elsewhere cannot run code when loaded,
and the classes it names are looked up among the known ones (:mod:`vlm.core.classes`), never
imported. ``vlm-convert`` turns a checkpoint of an earlier release into this format, once.
"""

from __future__ import annotations

import dataclasses
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.rank_zero import rank_zero_info
from omegaconf import DictConfig, ListConfig, OmegaConf
from transformers import AutoTokenizer

from vlm.core import hf_llava
from vlm.core.classes import known_class
from vlm.core.zoo.tower import VisionTower

FORMAT = 2  # 2: plain values only; family.model names its model class; the objective is a hyper-parameter


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (missing, truncated, foreign, or holding code); the
    one-line message says which file and what to do."""


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
    """The checkpoint holds every weight, so rebuilding must not fetch hub weights again (nor
    quantise them on loading: ``load_in``)."""
    if isinstance(cfg, dict):
        cleared = {"pretrained": False, "load_in": None}
        return {k: cleared[k] if k in cleared else without_pretrained(v) for k, v in cfg.items()}
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


def check_readable(path: str | Path) -> None:
    """Without loading it: ``path`` is a file and a whole torch zip archive."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path} is not a torch checkpoint (not a zip archive, or a truncated one)")


def read_checkpoint(path: str | Path, map_location: str = "cpu", mmap: bool = False) -> dict:
    """One of our checkpoints, read without running code from it."""
    check_readable(path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path} holds objects other than tensors and plain values, and loading it could run code "
            f"from the file, so it is not loaded; a checkpoint of an earlier vlm-lab you trust is "
            f"converted once with: vlm-convert ckpt={path} out=<new.ckpt>"
        ) from err
    except (RuntimeError, EOFError, OSError) as err:
        raise CheckpointError(
            f"{path} is not a readable torch checkpoint: {str(err).splitlines()[0]}"
        ) from err
    extra = ckpt.get("vlm") if isinstance(ckpt, dict) else None
    if extra is None:
        raise CheckpointError(f"{path} has no tokenizer and model config: not a vlm-lab checkpoint")
    if extra.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is a vlm-lab checkpoint of format {extra.get('format', 1)}, this version reads "
            f"format {FORMAT}: convert it once with vlm-convert ckpt={path} out=<new.ckpt>"
        )
    return ckpt


def load_module(path: str | Path, base: type, map_location: str = "cpu"):
    """The LightningModule a checkpoint holds (its class must be a ``base``), in eval mode."""
    ckpt = read_checkpoint(path, map_location)
    target = known_class(ckpt["vlm"]["module"], base, f"{Path(path).name}'s module")
    tokenizer = tokenizer_from_dict(ckpt["vlm"]["tokenizer"])
    module = target(**rebuild_hparams(ckpt["hyper_parameters"]), tokenizer=tokenizer)
    missing, unexpected = module.load_state_dict(ckpt["state_dict"], strict=False)
    if unexpected or set(missing) - never_run_keys(module):
        module.load_state_dict(ckpt["state_dict"])  # strict: torch names what does not match
    module.data_config = ckpt["vlm"].get("data")
    return module.eval()


def never_run_keys(module: torch.nn.Module) -> set[str]:
    """State-dict names of what the vision towers keep but never run (heads, final norms):
    checkpoints written before towers kept them lack them, and nothing reads them."""
    never = {
        id(p)
        for tower in module.modules()
        if isinstance(tower, VisionTower)
        for piece in tower.never_run()
        for p in ([piece] if isinstance(piece, torch.nn.Parameter) else piece.parameters())
    }
    return {name for name, p in module.named_parameters() if id(p) in never}


def checkpoint_tokenizer(path: str | Path):
    """The tokenizer stored in one of our checkpoints."""
    return tokenizer_from_dict(read_checkpoint(path, mmap=True)["vlm"]["tokenizer"])


def load_matching(module: torch.nn.Module, path: str | Path) -> None:
    """Initialise from an earlier stage's checkpoint (stage 2 from stage 1), or from a llava-hf
    folder (``hf:<folder or hub id>``, :mod:`vlm.core.hf_llava`): every tensor whose name and
    shape match is copied; the counts are said so a wrong file shows."""
    if hf_llava.is_hf(str(path)):
        state = {f"model.{k}": v for k, v in hf_llava.our_state_dict(str(path)).items()}
    else:
        state = read_checkpoint(path)["state_dict"]
    own = module.state_dict()
    match = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if hf_llava.is_hf(str(path)) and len(match) < len(state):  # the architecture was made to match
        key = next(k for k in state if k not in match)
        here = tuple(own[key].shape) if key in own else "no such tensor"
        raise CheckpointError(f"init_from {path}: {key} is {tuple(state[key].shape)} there, {here} here")
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

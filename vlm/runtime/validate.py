"""A composed run, checked before any data is generated or read, any tokenizer trained and any
weight loaded, so that a config that cannot run says so in seconds, in one line, whatever the
model's size.

In order: what the config may instantiate; the stage's frozen dtype against the precision;
``ckpt_path`` and ``stage.init_from`` (readable, ours, weights-only); the data files each split
that will run reads; the hub weights of every pretrained part (offline: in the local cache);
then the model itself, built on the ``meta`` device with the family's own builders and the
stage's recipe (layer sets, CALM's module count, ``select_layer``, LoRA targets, the objective),
which costs no memory and no weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from vlm.core import hf_llava
from vlm.core.checkpoint import CheckpointError, read_checkpoint, without_pretrained
from vlm.core.zoo.hub import require_local, weights_hub_id
from vlm.runtime.errors import ConfigError, expected_error, message, unwrapped
from vlm.runtime.frozen_dtype import frozen_dtype

# What a config may name as a `_target_` (Hydra's own `hydra` node aside, which Hydra checks).
ALLOWED_TARGETS = ("vlm.", "torch.", "lightning.", "transformers.", "timm.", "peft.", "hydra.")
PRETRAINED_PARTS = {"encoder": "encoder", "augmenting": "encoder", "llm": "llm"}  # node -> zoo kind
HUB_PARTS = ("vlm", "sam")  # nodes whose `name` is a hub id (sam_segmentation)


def validate(cfg: DictConfig, data: bool = True) -> None:
    """Raises the first problem as a one-line error (``ConfigError`` or the zoo's and the
    checkpoint's own). ``data=False``: a run that reads no data files (a benchmark)."""
    checks = [check_targets, check_precision, check_checkpoints, check_data, check_weights, check_model]
    for check in checks if data else [c for c in checks if c is not check_data]:
        _one_line(check, cfg)


def _one_line(check: Callable[[DictConfig], None], cfg: DictConfig) -> None:
    """An expected error passes as it is (unwrapped); a ``ValueError``, ``TypeError`` or
    ``KeyError`` from a builder is the config's fault and becomes a ``ConfigError``."""
    try:
        check(cfg)
    except Exception as err:
        inner = unwrapped(err)
        if expected_error(inner) is not None:
            raise inner from None
        if isinstance(inner, ValueError | TypeError | KeyError):
            raise ConfigError(message(inner)) from err
        raise


def _targets(node: Any, path: str) -> Iterator[tuple[str, str]]:
    if isinstance(node, dict):
        if isinstance(node.get("_target_"), str):
            yield path, node["_target_"]
        for key, value in node.items():
            yield from _targets(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _targets(value, f"{path}[{i}]")


def check_targets(cfg: DictConfig) -> None:
    """Every ``_target_`` names a class of the field's own packages: a config (or a shared
    experiment file) cannot make the run call arbitrary code, unless ``allow_external_targets``."""
    if cfg.get("allow_external_targets"):
        return
    tree = OmegaConf.to_container(cfg, resolve=False)
    tree.pop("hydra", None)
    for path, target in _targets(tree, ""):
        if not target.startswith(ALLOWED_TARGETS):
            allowed = ", ".join(p.rstrip(".") for p in ALLOWED_TARGETS)
            raise ConfigError(
                f"{path}._target_={target!r} is outside the packages a config may instantiate ({allowed}): "
                "set allow_external_targets=true to run it"
            )


def check_precision(cfg: DictConfig) -> None:
    name = OmegaConf.select(cfg, "stage.frozen_dtype", default=None)
    if name:
        frozen_dtype(name, OmegaConf.select(cfg, "trainer.precision", default=None))


def check_checkpoints(cfg: DictConfig) -> None:
    for key in ("ckpt_path", "stage.init_from"):
        path = OmegaConf.select(cfg, key, default=None)
        if key == "stage.init_from" and hf_llava.is_hf(path):
            hf_llava.read_config(hf_llava.source_folder(path))
        elif path:
            try:
                read_checkpoint(path, mmap=True)
            except CheckpointError as err:
                raise CheckpointError(f"{key}: {err}") from None


def evaluated_splits(cfg: DictConfig) -> list[str]:
    """The splits this run reads: train and val when it trains (val unless turned off), test
    when it tests."""
    splits = []
    if cfg.get("train", True):
        splits.append("train")
        if OmegaConf.select(cfg, "trainer.limit_val_batches", default=None) != 0:
            splits.append("val")
    if cfg.get("test", False):
        splits.append("test")
    return splits


def check_data(cfg: DictConfig) -> None:
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.check_files([s for s in evaluated_splits(cfg) if s != "test" or datamodule.has_split("test")])


def check_weights(cfg: DictConfig) -> None:
    """Offline, every pretrained part's weights (and a hub tokenizer) are in the local cache."""
    for node, kind in PRETRAINED_PARTS.items():
        part = cfg.get(node)
        if part is not None and part.get("pretrained"):
            hub_id = weights_hub_id(kind, part.name)
            if hub_id is not None:
                require_local(hub_id, f"{node}.pretrained")
    for node in HUB_PARTS:
        part = cfg.get(node)
        if part is not None and part.get("pretrained"):
            require_local(part.name, f"{node}.pretrained")
    load_in = OmegaConf.select(cfg, "vlm.load_in", default=None)
    if load_in and not torch.cuda.is_available():
        what = f"vlm.load_in={load_in}: 4/8-bit loading needs bitsandbytes on a CUDA device"
        raise ConfigError(f"{what}; this machine has none")
    name = OmegaConf.select(cfg, "tokenizer.name", default=None)
    if name not in (None, "auto") and not Path(name).exists():
        require_local(name, "tokenizer.name", weights=False)


class ShapeTokenizer:
    """What building a model asks of its tokenizer: a vocabulary size, the ``<image>`` id, and
    room for the special tokens a family adds (``[SEG]``)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def get_vocab(self) -> dict[str, int]:
        return {}

    def add_special_tokens(self, tokens: dict, **kwargs) -> int:
        added = sum(len(v) if isinstance(v, list) else 1 for v in tokens.values())
        self.size += added
        return added

    def __len__(self) -> int:
        return self.size

    def convert_tokens_to_ids(self, token: str) -> int:
        return 0


def check_model(cfg: DictConfig) -> None:
    """The family's LightningModule built on the meta device: every builder and the recipe run,
    on tensors without storage, with pretrained parts at their real architecture."""
    family = without_pretrained(OmegaConf.to_container(cfg.family, resolve=True)) | {"init_from": None}
    vocab = OmegaConf.select(cfg, "tokenizer.vocab_size", default=None) or 1024
    with torch.device("meta"):
        hydra.utils.instantiate(family, tokenizer=ShapeTokenizer(vocab), _recursive_=False)

"""Tokenizer and LightningModule from a composed config, without the datamodule.

``vlm-train`` builds them from the dataset's text; ``vlm-bench`` from synthetic text. Both go
through these two functions, so a benchmark measures the module training would build.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf
from transformers import PreTrainedTokenizerBase

from vlm.core import hf_llava
from vlm.core.checkpoint import checkpoint_tokenizer
from vlm.core.lit_module import VLMLitModule
from vlm.runtime.errors import ConfigError


def build_tokenizer(
    cfg: DictConfig, corpus: Iterable[str], output_dir: str | None = None
) -> PreTrainedTokenizerBase:
    """The ``tokenizer`` group's tokenizer (hub, or trained on ``corpus``), saved beside the run.

    A stage that starts from an earlier stage's checkpoint (``stage.init_from``) keeps that
    stage's tokenizer: a new in-process tokenizer would renumber the vocabulary under the
    trained embeddings.
    """
    init_from = cfg.get("stage", {}).get("init_from")
    if hf_llava.is_hf(init_from):
        tokenizer = hf_llava.tokenizer(init_from)
    elif init_from:
        tokenizer = checkpoint_tokenizer(init_from)
    else:
        # The corpus goes to the built callable, not through instantiate, which would wrap
        # each of its strings in OmegaConf (17 s for the default run's 99k strings).
        tokenizer = hydra.utils.instantiate(cfg.tokenizer, _partial_=True)(corpus=list(corpus))
    if output_dir:
        tokenizer.save_pretrained(Path(output_dir) / "tokenizer")
    return tokenizer


def with_hf_architecture(cfg: DictConfig) -> DictConfig:
    """``stage.init_from=hf:<folder or hub id>``: the llava family's encoder, LLM, connector,
    layer selection and tokenizer become the checkpoint's, whatever the config chose."""
    init_from = OmegaConf.select(cfg, "stage.init_from", default=None)
    if not hf_llava.is_hf(init_from):
        return cfg
    target = OmegaConf.select(cfg, "family.model._target_", default=None)
    if target != "vlm.core.llava.LlavaModel":
        raise ConfigError(f"stage.init_from={init_from} initialises family=llava, not {target}")
    for key, value in hf_llava.run_config(init_from).items():
        OmegaConf.update(cfg, key, value, merge=False, force_add=True)
    return cfg


def build_module(cfg: DictConfig, tokenizer: PreTrainedTokenizerBase) -> VLMLitModule:
    """The family's LightningModule; its model parts are built from plain config dicts."""
    mode = OmegaConf.select(cfg, "image_positions.name", default="flat")
    if mode != "flat" and "image_positions" not in cfg.family.get("model", {}):
        raise ConfigError(
            f"image_positions={mode}: this family's model places image tokens itself (a whole VLM's "
            "own positions); use image_positions=flat"
        )
    return hydra.utils.instantiate(cfg.family, tokenizer=tokenizer, _recursive_=False)

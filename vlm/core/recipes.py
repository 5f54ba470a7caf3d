"""Training recipes: for each model part a tune type, applied once before training.

Tune types (TinyLLaVA Factory's recipe names, honoured by every part here):
``frozen`` (no gradients, eval mode), ``full``, ``lora`` (peft adapters; base frozen) and
``partial`` (only the first or last ``k`` blocks).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from peft import LoraConfig, inject_adapter_in_model
from torch import nn

TUNE_TYPES = ("frozen", "full", "lora", "partial")


@dataclass
class PartTune:
    type: str = "full"
    k: int = 1  # partial: how many blocks
    side: str = "last"  # partial: "first" | "last"
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_targets: list[str] | None = None  # None: every nn.Linear of the part's blocks


@dataclass
class Recipe:
    """Per-part tune types; extra parts (CALM modules, fusion modules) go in ``extra``."""

    vision_tower: PartTune = field(default_factory=lambda: PartTune("frozen"))
    connector: PartTune = field(default_factory=lambda: PartTune("full"))
    llm: PartTune = field(default_factory=lambda: PartTune("frozen"))
    extra: dict[str, PartTune] = field(default_factory=dict)


def apply_tune(part: nn.Module, tune: PartTune, blocks: nn.ModuleList | None, name: str) -> None:
    """Set ``requires_grad`` on ``part`` as ``tune`` says; ``blocks`` are its repeated layers."""
    if tune.type not in TUNE_TYPES:
        raise ValueError(f"tune.{name}={tune.type!r}: choose from {', '.join(TUNE_TYPES)}")
    part.requires_grad_(tune.type == "full")
    if tune.type == "partial":
        if blocks is None:
            raise ValueError(f"tune.{name}=partial needs a part with blocks")
        if not 0 < tune.k <= len(blocks):
            raise ValueError(f"tune.{name}.k={tune.k} is outside 1..{len(blocks)} blocks")
        if tune.side not in ("first", "last"):
            raise ValueError(f"tune.{name}.side must be 'first' or 'last', got {tune.side!r}")
        chosen = blocks[: tune.k] if tune.side == "first" else blocks[-tune.k :]
        for block in chosen:
            block.requires_grad_(True)
    elif tune.type == "lora":
        targets = tune.lora_targets or linear_names(blocks if blocks is not None else part, part)
        config = LoraConfig(
            r=tune.lora_r,
            lora_alpha=tune.lora_alpha,
            lora_dropout=tune.lora_dropout,
            target_modules=targets,
        )
        inject_adapter_in_model(config, part)
        for pname, param in part.named_parameters():
            param.requires_grad_("lora_" in pname)


def linear_names(scope: nn.Module, root: nn.Module) -> list[str]:
    """Full names (relative to ``root``) of the nn.Linear layers inside ``scope``: LoRA goes on
    the attention and MLP projections of the blocks, never on the LM head or embeddings."""
    inside = {id(m) for m in scope.modules()}
    return [n for n, m in root.named_modules() if isinstance(m, nn.Linear) and id(m) in inside]

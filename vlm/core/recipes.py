"""Training recipes: for each model part a tune type, applied once before training.

Tune types (TinyLLaVA Factory's recipe names, honoured by every part here):
``frozen`` (no gradients, eval mode), ``full``, ``lora`` (peft adapters; base frozen) and
``partial`` (only the first or last ``k`` blocks).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from vlm.core.zoo.tower import VisionTower

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


def is_frozen(module: nn.Module) -> bool:
    """No parameter of ``module`` trains (a module without parameters counts as frozen)."""
    return not any(p.requires_grad for p in module.parameters())


def keep_frozen_in_eval(parts: Iterable[nn.Module]) -> None:
    """After ``train()``: frozen parts go back to eval mode (no dropout, fixed norms, DINOv2's
    layer scale as trained), whatever mode Lightning asked the whole model for."""
    for part in parts:
        if is_frozen(part):
            part.eval()


def apply_recipe(model: nn.Module, tune: dict) -> None:
    """``tune``: part name -> ``PartTune`` fields; parts left out are frozen. The model first
    expands its shorthands (``resolve_tune``); modules no output depends on (``unused``, and what
    every vision tower inside never runs) stay frozen whatever the recipe says, so DDP never
    waits for a gradient that cannot come."""
    tune = model.resolve_tune(dict(tune))
    parts = model.parts()
    unknown = set(tune) - set(parts)
    if unknown:
        raise ValueError(f"tune has unknown parts {sorted(unknown)}: known {sorted(parts)}")
    for name, part in parts.items():
        apply_tune(part, PartTune(**(tune.get(name) or {"type": "frozen"})), model.blocks(name), name)
    for module in model.unused():
        module.requires_grad_(False)
    for tower in (m for m in model.modules() if isinstance(m, VisionTower)):
        for piece in tower.never_run():
            piece.requires_grad_(False)
    if is_frozen(model):
        raise ValueError("the recipe trains nothing: every part is frozen")
    model.train(model.training)  # frozen parts to eval now: Lightning keeps the modes it finds


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

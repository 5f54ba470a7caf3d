"""CALM-Vision as a LightningModule: the LLaVA core with the composite tower plugged in.

Recipe parts are ``anchor``, ``augmenting``, ``calm`` (the modules), ``connector`` and
``llm``. The seed's shorthand ``tune.vision_tower`` expands onto the three tower parts:
``calm`` trains only the modules (both towers frozen), ``frozen`` freezes all three (stage 2
with modules fixed), ``full`` trains all three; a part named on its own overrides it.
"""

from __future__ import annotations

import hydra
import torch
from torch import nn

from vlm.core.lit_module import VLMLitModule
from vlm.core.llava import LlavaModel
from vlm.core.processor import image_transform
from vlm.core.tokenizer import IMAGE_TOKEN
from vlm.core.zoo.llms import decoder_layers
from vlm.families.calm.tower import CalmTower

TOWER_PARTS = ("anchor", "augmenting", "calm")
SHORTHAND = {"calm": ("frozen", "frozen", "full"), "frozen": ("frozen",) * 3, "full": ("full",) * 3}


def build_augmenting(cfg: dict, anchor: nn.Module, match_grid: bool) -> nn.Module:
    """The augmenting tower; with ``match_grid`` it is rebuilt at the input size that gives
    the anchor's patch grid (DINOv2-L/14 next to CLIP-L/14-336: 336 px, 24x24), so both
    towers see the same field of view per token instead of DINOv2's own 224 px (16x16)."""
    tower = hydra.utils.instantiate(cfg)
    side, aug_side = _grid_side(anchor), _grid_side(tower)
    if not match_grid or side == aug_side:
        return tower
    stride = tower.image_spec.size // aug_side
    return hydra.utils.instantiate(cfg, image_size=side * stride)


def _grid_side(tower: nn.Module) -> int:
    return round(tower.num_patches**0.5)


def build_calm(cfg: dict, tokenizer) -> LlavaModel:
    anchor = hydra.utils.instantiate(cfg["vision_tower"])
    calm = dict(cfg["calm"])
    augmenting = build_augmenting(cfg["augmenting"], anchor, calm.pop("match_grid", False))
    llm = hydra.utils.instantiate(cfg["llm"], vocab_size=len(tokenizer))
    connector = hydra.utils.instantiate(cfg["connector"])(anchor.hidden_size, llm.config.hidden_size)
    select_layer = cfg.get("select_layer", -2)
    output = select_layer if select_layer >= 0 else anchor.depth + 1 + select_layer
    tower = CalmTower(anchor, augmenting, output_layer=output, **calm)
    if tower.skipped:
        print(
            f"calm: composition layers {tower.skipped} lie past the output layer {output} "
            f"(select_layer={select_layer}) and could not change the features: no module there; "
            f"modules at {tower.layers}"
        )
    return LlavaModel(
        tower,
        connector,
        llm,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        select_layer=select_layer,
        select_feature=cfg.get("select_feature", "patch"),
    )


class CalmModule(VLMLitModule):
    def build_model(self, cfg: dict, tokenizer) -> nn.Module:
        return build_calm(cfg, tokenizer)

    @property
    def tower(self) -> CalmTower:
        return self.model.vision_tower

    def parts(self) -> dict[str, nn.Module]:
        t = self.tower
        return {
            "anchor": t.anchor,
            "augmenting": t.augmenting,
            "calm": t.calm,
            "connector": self.model.connector,
            "llm": self.model.llm,
        }

    def blocks_of(self, name: str):
        if name in ("anchor", "augmenting"):
            return self.parts()[name].blocks
        if name == "llm":
            return decoder_layers(self.model.llm)
        return None

    def apply_recipe(self, tune: dict) -> None:
        tune = dict(tune)
        short = tune.pop("vision_tower", None)
        if short is not None:
            kind = short.get("type", "full")
            if kind not in SHORTHAND:
                raise ValueError(
                    f"tune.vision_tower={kind!r} for CALM: choose from {', '.join(SHORTHAND)}, "
                    f"or set tune.anchor / tune.augmenting / tune.calm one by one"
                )
            tune = {p: {"type": t} for p, t in zip(TOWER_PARTS, SHORTHAND[kind], strict=True)} | tune
        super().apply_recipe(tune)

    def image_transforms(self) -> dict:
        """Each tower its own size, mean and std (CLIP and DINOv2 normalise differently)."""
        t = self.tower
        return {
            "anchor": image_transform(t.anchor.image_spec),
            "augmenting": image_transform(t.augmenting.image_spec),
        }

    # -- monitoring ----------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int):
        if self.monitoring_step():
            for m in self.tower.calm.values():
                m.record_entropy = True
        loss = super().training_step(batch, batch_idx)
        entropy = {}
        for layer, m in self.tower.calm.items():
            if m.entropy is not None:
                entropy[f"calm/entropy_{layer}"], m.entropy = m.entropy, None
        self.log_now(entropy)
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        """Per-module gradient norm (after DDP's all-reduce): a module stuck at zero is the
        failure mode to catch."""
        if not self.monitoring_step():
            return
        norms = {}
        for layer, m in self.tower.calm.items():
            grads = [p.grad.norm() for p in m.parameters() if p.grad is not None]
            norms[f"calm/grad_norm_{layer}"] = torch.linalg.vector_norm(torch.stack(grads)) if grads else 0.0
        self.log_now(norms)

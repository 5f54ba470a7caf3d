"""CALM-Vision: the LLaVA core with the composite tower plugged in.

Recipe parts are ``anchor``, ``augmenting``, ``calm`` (the modules), ``connector`` and
``llm``. The seed's shorthand ``tune.vision_tower`` expands onto the three tower parts:
``calm`` trains only the modules (both towers frozen), ``frozen`` freezes all three (stage 2
with modules fixed), ``full`` trains all three; a part named on its own overrides it.
"""

from __future__ import annotations

from typing import Any

import hydra
from lightning.fabric.utilities.rank_zero import rank_zero_info
from torch import nn

from vlm.core.builder import build_parts
from vlm.core.hf_llava import NotExportable
from vlm.core.llava import LlavaModel
from vlm.core.processor import image_transform
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


class CalmModel(LlavaModel):
    vision_tower: CalmTower

    @classmethod
    def from_config(
        cls,
        tokenizer: Any,
        vision_tower: dict,
        augmenting: dict,
        llm: dict,
        connector: dict,
        calm: dict,
        select_layer: int = -2,
        select_feature: str = "patch",
        image_positions: dict | None = None,
    ) -> CalmModel:
        """``vision_tower`` is the anchor; ``calm`` the :class:`CalmTower` options plus
        ``match_grid``. The modules are built past the layer the core reads only if they could
        change it, which is said once."""
        anchor = hydra.utils.instantiate(vision_tower)
        calm = dict(calm)
        aug = build_augmenting(augmenting, anchor, calm.pop("match_grid", False))
        p = build_parts(tokenizer, vision_tower, llm, connector, select_layer, select_feature, tower=anchor)
        connector_module = p.connector()
        tower = CalmTower(anchor, aug, output_layer=p.select_index, **calm)
        if tower.skipped:
            rank_zero_info(
                f"calm: composition layers {tower.skipped} lie past the output layer {p.select_index} "
                f"(select_layer={select_layer}) and could not change the features: no module there; "
                f"modules at {tower.layers}"
            )
        return cls(
            tower,
            connector_module,
            p.llm,
            p.image_token_id,
            p.select_index,
            p.select_feature,
            image_positions,
        )

    def parts(self) -> dict[str, nn.Module]:
        t = self.vision_tower
        return {
            "anchor": t.anchor,
            "augmenting": t.augmenting,
            "calm": t.calm,
            "connector": self.connector,
            "llm": self.llm,
        } | self.position_part()

    def blocks(self, part: str) -> nn.ModuleList | None:
        if part in ("anchor", "augmenting"):
            return self.parts()[part].blocks
        if part == "llm":
            return decoder_layers(self.llm)
        return None

    def hf_llava_layout(self) -> tuple[list[int], nn.Module]:
        raise NotExportable(
            "CALM's cross-attention composition of two towers has no place in HF's LLaVA, which reads "
            "one tower: family=llava (or calm's CLIP-only baseline, experiment=calm_shapes_clip_only) exports"
        )

    def unused(self) -> list[nn.Module]:
        """Anchor blocks past the layer read, and augmenting blocks past the deepest paired one."""
        aug = self.vision_tower.augmenting
        return [*super().unused(), *aug.blocks[self.vision_tower.augmenting_depth_read :]]

    def resolve_tune(self, tune: dict) -> dict:
        tune = super().resolve_tune(tune)
        short = tune.pop("vision_tower", None)
        if short is None:
            return tune
        kind = short.get("type", "full")
        if kind not in SHORTHAND:
            raise ValueError(
                f"tune.vision_tower={kind!r} for CALM: choose from {', '.join(SHORTHAND)}, "
                f"or set tune.anchor / tune.augmenting / tune.calm one by one"
            )
        return {p: {"type": t} for p, t in zip(TOWER_PARTS, SHORTHAND[kind], strict=True)} | tune

    def image_transforms(self) -> dict:
        """Each tower its own size, mean and std (CLIP and DINOv2 normalise differently)."""
        t = self.vision_tower
        return {
            "anchor": image_transform(t.anchor.image_spec),
            "augmenting": image_transform(t.augmenting.image_spec),
        }

    # -- module health: attention entropy (recorded in the forward) and gradient norm ------------
    def arm_monitors(self) -> None:
        for m in self.vision_tower.calm.values():
            m.record_entropy = True

    def monitor_values(self) -> dict:
        out = {}
        for layer, m in self.vision_tower.calm.items():
            if m.entropy is not None:
                out[f"calm/entropy_{layer}"], m.entropy = m.entropy, None
        return out

    def monitored_gradients(self) -> dict[str, nn.Module]:
        """Per-module gradient norm (after DDP's all-reduce): a module stuck at zero is the
        failure mode to catch."""
        return {f"calm/grad_norm_{layer}": m for layer, m in self.vision_tower.calm.items()}

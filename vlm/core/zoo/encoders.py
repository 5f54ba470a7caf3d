"""Vision towers by name: HF CLIP / SigLIP / DINOv2 and timm ViTs behind one interface.

Each HF tower's ``embed`` -> ``run_block`` loop reproduces the model's own
``output_hidden_states`` (tested), so layer indices mean what they mean in the papers.
"""

from typing import Any

import torch
from torch import Tensor, nn
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    Dinov2Config,
    Dinov2Model,
    PreTrainedModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from vlm.core.zoo.hub import load_pretrained
from vlm.core.zoo.registry import ImageSpec, VisionEntry, arch_config, reject_unknown, vision_entry
from vlm.core.zoo.timm_tower import build_timm_tower
from vlm.core.zoo.tower import VisionTower

__all__ = ["ImageSpec", "VisionTower", "build_vision_tower"]


class _HFTower(VisionTower):
    @property
    def interpolate(self) -> bool:
        """Inputs at another size than the position grid was built for are interpolated."""
        return self.image_spec.size != self.model.config.image_size

    def run_block(self, i: int, h: Tensor) -> Tensor:
        return self.blocks[i](h, None)  # no attention mask: every token sees every token


class ClipTower(_HFTower):
    """CLIP records hidden_states[0] after ``pre_layrnorm``, so ``embed`` includes it."""

    unused = ("post_layernorm",)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.encoder.layers

    def embed(self, pixel_values: Tensor) -> Tensor:
        h = self.model.embeddings(pixel_values, interpolate_pos_encoding=self.interpolate)
        return self.model.pre_layrnorm(h)


class SiglipTower(_HFTower):
    unused = ("post_layernorm", "head")

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.encoder.layers

    def embed(self, pixel_values: Tensor) -> Tensor:
        return self.model.embeddings(pixel_values, interpolate_pos_encoding=self.interpolate)


class Dinov2Tower(_HFTower):
    """DINOv2 interpolates its position grid for any input size by itself; its mask token is
    for masked-image pretraining only."""

    unused = ("layernorm", "embeddings.mask_token")

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.encoder.layer

    def embed(self, pixel_values: Tensor) -> Tensor:
        return self.model.embeddings(pixel_values)


# family -> (config class, model class, tower class, prefix tokens)
_HF_FAMILIES: dict[str, tuple[type, type[PreTrainedModel], type[_HFTower], int]] = {
    "clip": (CLIPVisionConfig, CLIPVisionModel, ClipTower, 1),
    "siglip": (SiglipVisionConfig, SiglipVisionModel, SiglipTower, 0),
    "dinov2": (Dinov2Config, Dinov2Model, Dinov2Tower, 1),
}


def build_vision_tower(
    name: str,
    pretrained: bool = False,
    preset: str = "tiny",
    image_size: int | None = None,
    image_mean: tuple[float, float, float] | None = None,
    image_std: tuple[float, float, float] | None = None,
    **overrides: Any,
) -> VisionTower:
    """Build the tower ``name`` (a registry entry or ``timm:<vit name>``).

    ``preset="tiny"``: the entry's small config, random init, built at ``image_size``.
    ``preset="real"``: the real architecture, random init (benchmarks). ``pretrained=True``:
    hub weights from the local HF cache (``preset`` is then ignored). ``image_size`` for
    real/pretrained changes the input resolution, interpolating position embeddings.
    ``overrides`` are config keys (timm kwargs for timm towers), plus ``attn_implementation``
    (default "sdpa") and, when pretrained, ``dtype`` (default float32). ``image_mean`` /
    ``image_std`` replace the entry's normalisation (an imported checkpoint's processor's).
    An entry without an architecture of its own (``clip_vision_model``) is built at the
    ``image_size`` of its config.
    """
    entry = vision_entry(name)
    if entry.family == "timm":
        return build_timm_tower(name, entry, pretrained, preset, image_size, overrides)
    config_cls, model_cls, tower_cls, prefix = _HF_FAMILIES[entry.family]
    attn = overrides.pop("attn_implementation", "sdpa")
    reject_unknown(config_cls(), overrides, name)
    if pretrained:
        model = _load_hf(name, entry, model_cls, overrides | {"attn_implementation": attn})
        size = image_size or entry.image_spec.size
    else:
        arch = arch_config(entry, preset, overrides)
        native = preset == "tiny" or not entry.arch  # built at the size it reads
        if image_size and native:
            arch["image_size"] = image_size
        model = model_cls(config_cls(**arch, attn_implementation=attn))
        size = image_size or (model.config.image_size if native else entry.image_spec.size)
    cfg = model.config
    spec = ImageSpec(
        size, tuple(image_mean or entry.image_spec.mean), tuple(image_std or entry.image_spec.std)
    )
    return tower_cls(name, model, spec, cfg.hidden_size, prefix, (size // cfg.patch_size) ** 2)


def _load_hf(
    name: str, entry: VisionEntry, model_cls: type[PreTrainedModel], overrides: dict[str, Any]
) -> PreTrainedModel:
    if entry.hub_id is None:
        raise ValueError(f"vision tower {name!r} has no pretrained weights; set encoder.pretrained=false")
    kwargs = {"dtype": torch.float32} | overrides
    return load_pretrained(
        lambda src: model_cls.from_pretrained(src, **kwargs), entry.hub_id, "encoder.pretrained"
    )

"""Any timm ViT (``timm:<name>``, ``tiny_timm_vit``) behind the vision-tower interface."""

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models import get_pretrained_cfg
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from vlm.core.zoo.hub import load_pretrained
from vlm.core.zoo.registry import ImageSpec, VisionEntry, arch_config
from vlm.core.zoo.tower import VisionTower


def with_coordinates(pixel_values: Tensor) -> Tensor:
    """Two more input channels holding each pixel's x and y in [-1, 1] (CoordConv, Liu et al.
    2018): a convolutional stem is translation-equivariant, so without them where a thing is
    reaches the tokens only through the position embeddings, added after the stem."""
    b, _, h, w = pixel_values.shape
    kw = dict(device=pixel_values.device, dtype=pixel_values.dtype)
    ys = torch.linspace(-1, 1, h, **kw).view(1, 1, h, 1).expand(b, 1, h, w)
    xs = torch.linspace(-1, 1, w, **kw).view(1, 1, 1, w).expand(b, 1, h, w)
    return torch.cat([pixel_values, xs, ys], dim=1)


class TimmTower(VisionTower):
    """``embed`` is ``forward_features`` up to the blocks: (coordinate channels,) patches,
    prefix tokens + positions, patch dropout, pre-norm."""

    unused = ("norm", "fc_norm")
    coord_channels = False

    @property
    def blocks(self) -> nn.Sequential:
        return self.model.blocks

    def embed(self, pixel_values: Tensor) -> Tensor:
        m = self.model
        if self.coord_channels:
            pixel_values = with_coordinates(pixel_values)
        return m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(pixel_values))))


def build_timm_tower(
    name: str,
    entry: VisionEntry,
    pretrained: bool,
    preset: str,
    image_size: int | None,
    overrides: Mapping[str, Any],
) -> TimmTower:
    """timm resamples pretrained position embeddings itself when ``img_size`` differs.
    ``coord_channels: true`` feeds the patch embedding x/y channels too (``with_coordinates``;
    timm adapts a pretrained first layer to the 5 input channels)."""
    overrides = dict(overrides)
    coord_channels = bool(overrides.pop("coord_channels", False))
    if coord_channels:
        overrides["in_chans"] = 5
    kwargs = overrides if pretrained else arch_config(entry, preset, overrides)
    if image_size:
        kwargs["img_size"] = image_size
    if pretrained:
        cfg = get_pretrained_cfg(entry.timm_name)
        if cfg is None or cfg.hf_hub_id is None:
            raise ValueError(
                f"timm model {entry.timm_name!r} has no hub weights; set encoder.pretrained=false"
            )
        model = load_pretrained(
            lambda src: _create(entry.timm_name, kwargs, src), cfg.hf_hub_id, "encoder.pretrained"
        )
    else:
        model = _create(entry.timm_name, kwargs)
    if not isinstance(model, VisionTransformer):
        raise ValueError(f"{name!r} is a {type(model).__name__}; timm towers must be VisionTransformer")
    grid_h, grid_w = model.patch_embed.grid_size
    cfg = model.pretrained_cfg
    spec = ImageSpec(model.patch_embed.img_size[0], tuple(cfg["mean"]), tuple(cfg["std"]))
    tower = TimmTower(name, model, spec, model.embed_dim, model.num_prefix_tokens, grid_h * grid_w)
    tower.coord_channels = coord_channels
    return tower


def _create(timm_name: str, kwargs: dict[str, Any], source: str | None = None) -> nn.Module:
    """Random init without ``source``; with a local snapshot folder, weights from it; with a
    hub id, timm's own download."""
    overlay = dict(source="local-dir", file=source) if source and Path(source).is_dir() else {}
    return timm.create_model(
        timm_name, pretrained=source is not None, pretrained_cfg_overlay=overlay, num_classes=0, **kwargs
    )

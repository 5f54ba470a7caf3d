"""``image_positions``: how the LLM is told where each image token sits.

- ``flat``: image tokens take consecutive 1-D positions, as text does (LLaVA).
- ``mrope``: (temporal, height, width) rotary positions (Qwen2-VL's M-RoPE, :mod:`.mrope`).
- ``sincos2d`` / ``learned2d``: a 2-D embedding added to the connector's output (:mod:`.added`).

A scheme gives the model two things: the position ids of a batch (1 or 3 rows, passed to the
LLM in the forward pass and to ``generate``, which continues them), and what it adds to the
image features. The model's checkpoint config records the mode (``family.model.image_positions``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vlm.core.positions.added import Learned2D, SinCos2D
from vlm.core.positions.ids import position_ids
from vlm.core.positions.layout import ImageLayout, Piece
from vlm.core.positions.mrope import install_mrope

MODES = ("flat", "mrope", "sincos2d", "learned2d")

__all__ = ["MODES", "ImageLayout", "ImagePositions", "Piece", "build_image_positions"]


class ImagePositions(nn.Module):
    """Position ids for the LLM and what is added to the image features, for one mode."""

    def __init__(
        self,
        name: str,
        image_token_id: int,
        offsets: Tensor | None = None,
        extent: int = 1,
        added: nn.Module | None = None,
    ):
        super().__init__()
        self.name = name
        self.image_token_id = image_token_id
        flat = torch.zeros(1, 1, dtype=torch.long)  # one position per token, image or not
        self.register_buffer("offsets", flat if offsets is None else offsets, persistent=False)
        self.extent = extent
        self.added = added

    def position_ids(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, T) -> (B, T) positions, or (3, B, T) under M-RoPE."""
        ids = position_ids(input_ids, attention_mask, self.image_token_id, self.offsets, self.extent)
        return ids[0] if ids.shape[0] == 1 else ids

    def add(self, feats: Tensor) -> Tensor:
        """The connector's output (B_img, L, D) with this mode's 2-D embedding added, if any."""
        return feats if self.added is None else self.added(feats)


def build_image_positions(
    cfg: dict | None, layout: ImageLayout | None, llm: nn.Module, image_token_id: int
) -> ImagePositions:
    """The ``image_positions`` group's scheme for a model whose image span is ``layout``
    (None: a span with no grid, e.g. Q-Former queries, which only ``flat`` takes)."""
    cfg = dict(cfg or {})
    name = cfg.pop("name", "flat")
    if name not in MODES:
        raise ValueError(f"image_positions={name!r}: choose from {', '.join(MODES)}")
    if name != "flat" and layout is None:
        raise ValueError(
            f"image_positions={name} needs image tokens on a 2-D grid; this model's have none: use flat"
        )
    if name == "mrope":
        sections = cfg.pop("sections", None)
        _no_more(cfg, name)
        install_mrope(llm, None if sections is None else [int(s) for s in sections])
        return ImagePositions(name, image_token_id, *layout.mrope_offsets())
    if name == "flat":
        _no_more(cfg, name)
        return ImagePositions(name, image_token_id)
    kind = SinCos2D if name == "sincos2d" else Learned2D
    return ImagePositions(name, image_token_id, added=kind(layout, llm.config.hidden_size, **cfg))


def _no_more(cfg: dict, name: str) -> None:
    if cfg:
        raise ValueError(f"image_positions={name} takes no {sorted(cfg)}")

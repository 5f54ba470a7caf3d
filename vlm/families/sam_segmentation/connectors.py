"""The connectors that turn vision-language features into SAM's inputs.

The ImageTextConnector (vision -> the LLM's space) is the configured ``connector`` of
``mode=separate`` and the VLM's own projector in ``mode=vlm``; the two here are SAM-side.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class TextSAMConnector(nn.Module):
    """A hidden state (the ``[SEG]`` token's, or the pooled one) -> ``num_tokens`` sparse prompt
    embeddings for SAM's mask decoder: LISA's ``text_hidden_fcs`` (Linear, ReLU, Linear)."""

    def __init__(self, in_dim: int, sam_dim: int, num_tokens: int = 1, dropout: float = 0.0):
        super().__init__()
        self.sam_dim, self.num_tokens = sam_dim, num_tokens
        self.proj = nn.Sequential(
            nn.Linear(in_dim, in_dim), nn.ReLU(), nn.Linear(in_dim, sam_dim * num_tokens), nn.Dropout(dropout)
        )

    def forward(self, h: Tensor) -> Tensor:
        """(M, D) -> (M, num_tokens, sam_dim)."""
        return self.proj(h).view(h.shape[0], self.num_tokens, self.sam_dim)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, H, W) map, as SAM's image-encoder neck uses."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ImageEncoderSAMConnector(nn.Module):
    """The vision tower's patch grid (B, C, h, w) -> SAM's image embedding (B, sam_dim, E, E):
    SAM's neck (1x1 conv, LayerNorm, 3x3 conv, LayerNorm) with a bilinear resize to E x E
    between them, so any tower's grid (16 x 16 for CLIP-B/16 at 224 px) meets the decoder's
    64 x 64 (or the tiny equivalent)."""

    def __init__(self, in_channels: int, sam_dim: int, size: int):
        super().__init__()
        self.size = size
        self.reduce = nn.Sequential(nn.Conv2d(in_channels, sam_dim, 1, bias=False), LayerNorm2d(sam_dim))
        self.refine = nn.Sequential(
            nn.Conv2d(sam_dim, sam_dim, 3, padding=1, bias=False), LayerNorm2d(sam_dim)
        )

    def forward(self, grid: Tensor) -> Tensor:
        x = self.reduce(grid)
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return self.refine(x)

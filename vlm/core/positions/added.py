"""2-D position embeddings added to the connector's output tokens, so an image token's value
vectors carry where it sits (RoPE reaches only queries and keys). Tokens of no grid get none.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vlm.core.positions.layout import ImageLayout


def sincos_2d(y: Tensor, x: Tensor, width: int, temperature: float = 10000.0) -> Tensor:
    """(L,) coordinates -> (L, width) fixed embeddings, MAE's 2-D sin-cos: the first half of
    the channels encodes y, the second x, each as sines then cosines of geometric frequencies."""
    if width % 4:
        raise ValueError(f"image_positions=sincos2d needs an LLM width divisible by 4, got {width}")
    quarter = width // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    parts = []
    for coord in (y, x):
        angle = coord[:, None] * omega[None]
        parts += [angle.sin(), angle.cos()]
    return torch.cat(parts, 1).float()


class AddedPositions(nn.Module):
    """``feats + scale * table`` over the span's grid tokens; ``scale`` is learnt."""

    def __init__(self, layout: ImageLayout, init_scale: float):
        super().__init__()
        on_grid = layout.coordinates()[2]
        self.register_buffer("on_grid", on_grid[:, None].float(), persistent=False)
        self.scale = nn.Parameter(torch.tensor(float(init_scale)))

    def table(self) -> Tensor:
        raise NotImplementedError

    def forward(self, feats: Tensor) -> Tensor:
        """(B_img, L, D) connector output -> the same with positions added."""
        return feats + (self.scale * self.table() * self.on_grid).to(feats.dtype)


class SinCos2D(AddedPositions):
    """Fixed 2-D sin-cos table (as MAE's ViT), scaled by a learnt scalar from ``init_scale``."""

    def __init__(self, layout: ImageLayout, width: int, init_scale: float = 1.0):
        super().__init__(layout, init_scale)
        y, x, _ = layout.coordinates()
        self.register_buffer("fixed", sincos_2d(y, x, width), persistent=False)

    def table(self) -> Tensor:
        return self.fixed


class Learned2D(AddedPositions):
    """A learnt row embedding plus a learnt column embedding (factorised 2-D), behind a scale
    that starts at zero: at step 0 the model is the ``flat`` one, output for output."""

    def __init__(self, layout: ImageLayout, width: int, std: float = 0.02):
        super().__init__(layout, 0.0)
        rows, cols = layout.grid
        self.rows = nn.Parameter(torch.randn(rows, width) * std)
        self.cols = nn.Parameter(torch.randn(cols, width) * std)
        y, x, _ = layout.coordinates()
        clamp = lambda v, n: v.round().clamp(0, n - 1).long()  # noqa: E731
        self.register_buffer("row_index", clamp(y, rows), persistent=False)
        self.register_buffer("col_index", clamp(x, cols), persistent=False)

    def table(self) -> Tensor:
        return self.rows[self.row_index] + self.cols[self.col_index]

"""Connectors: vision features (B, P, D_v) -> LLM embedding space (B, P, D_llm).

Hydra builds them with ``_partial_: true``; the model completes the call with the widths it
knows from the zoo, so a connector file never repeats an encoder's or LLM's size.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from vlm.core.positions.layout import Piece


class Connector(nn.Module):
    """``linear`` (LLaVA-1) or ``mlp{depth}x_gelu`` (LLaVA-1.5: Linear, then GELU+Linear repeated).

    ``pool`` > 1 averages ``pool`` x ``pool`` neighbourhoods of the square patch grid first
    (as MobileVLM's LDP or Qwen2-VL's 2 x 2 merge shorten the image span): the LLM reads a
    ``pool``-squared fewer tokens, while a family that also needs the full grid (SAM's image
    embedding) keeps it."""

    def __init__(self, in_dim: int, out_dim: int, depth: int = 2, activation: str = "gelu", pool: int = 1):
        super().__init__()
        if pool < 1:
            raise ValueError(f"connector pool must be >= 1, got {pool}")
        self.pool = pool
        acts = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU}
        if depth < 1:
            raise ValueError(f"connector depth must be >= 1, got {depth}")
        if activation not in acts:
            raise ValueError(f"unknown connector activation '{activation}': choose from {list(acts)}")
        layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
        for _ in range(depth - 1):
            layers += [acts[activation](), nn.Linear(out_dim, out_dim)]
        self.proj = nn.Sequential(*layers)
        self.in_dim, self.out_dim = in_dim, out_dim

    def num_tokens(self, num_in: int) -> int:
        """Token count after the connector."""
        return num_in if self.pool == 1 else (self._side(num_in) // self.pool) ** 2

    def token_layout(self, side: int) -> tuple[Piece, ...]:
        """The output tokens of a ``side`` x ``side`` patch grid: the grid, pooled."""
        return (Piece(side // self.pool, side // self.pool),)

    def _side(self, n: int) -> int:
        side = math.isqrt(n)
        if side * side != n or side % self.pool:
            raise ValueError(
                f"connector pool={self.pool} needs a square grid whose side it divides, got {n} tokens"
            )
        return side

    def forward(self, x: Tensor) -> Tensor:
        if self.pool > 1:
            b, n, d = x.shape
            side = self._side(n)
            grid = x.transpose(1, 2).reshape(b, d, side, side)
            x = F.avg_pool2d(grid, self.pool).flatten(2).transpose(1, 2)
        return self.proj(x)

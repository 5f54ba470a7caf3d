"""One CALM composition module: map the augmenting state to the anchor's width, fuse it into
the anchor's state at the same relative depth.

Fusions (the seed's three): ``cross_attention`` is CALM's own, ``LN(h + MHA(h, a, a))``;
``gated_attention`` is Flamingo's ``h + tanh(alpha) * MHA(LN(h), a, a)`` with ``alpha = 0``,
so at initialisation the anchor runs exactly as it would alone; ``simple_add`` is
``LN(h + a)`` on a token grid resampled to the anchor's (the only fusion that needs aligned
tokens). Attention needs no alignment: every anchor token attends over all augmenting tokens,
whatever either grid is.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MAPPINGS = ("linear", "mlp", "attention")
FUSIONS = ("cross_attention", "gated_attention", "simple_add")


class AttentionMapping(nn.Module):
    """Linear to the anchor width, then one pre-norm self-attention layer over the augmenting
    tokens, so the mapping can mix context before the anchor reads it."""

    def __init__(self, d_in: int, d_out: int, num_heads: int):
        super().__init__()
        self.proj = nn.Linear(d_in, d_out)
        self.norm = nn.LayerNorm(d_out)
        self.attn = nn.MultiheadAttention(d_out, num_heads, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(x)
        y = self.norm(x)
        return x + self.attn(y, y, y, need_weights=False)[0]


def build_mapping(kind: str, d_in: int, d_out: int, num_heads: int) -> nn.Module:
    if kind == "linear":
        return nn.Linear(d_in, d_out)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(d_in, d_out), nn.GELU(), nn.Linear(d_out, d_out))
    if kind == "attention":
        return AttentionMapping(d_in, d_out, num_heads)
    raise ValueError(f"calm.mapping={kind!r}: choose from {', '.join(MAPPINGS)}")


class CompositionModule(nn.Module):
    """Fuses ``aug`` (B, T_aug, D_aug) into ``h`` (B, T, D); returns the new (B, T, D) state.

    ``prefix``/``aug_prefix`` are the class/register tokens before each tower's patch grid;
    they matter only to ``simple_add``'s resampling.
    """

    def __init__(
        self,
        dim: int,
        aug_dim: int,
        mapping: str = "linear",
        fusion: str = "cross_attention",
        num_heads: int = 8,
        prefix: int = 1,
        aug_prefix: int = 1,
    ):
        super().__init__()
        if fusion not in FUSIONS:
            raise ValueError(f"calm.fusion={fusion!r}: choose from {', '.join(FUSIONS)}")
        if dim % num_heads:
            raise ValueError(f"calm.num_heads={num_heads} does not divide the anchor width {dim}")
        self.fusion = fusion
        self.prefix, self.aug_prefix = prefix, aug_prefix
        self.mapping = build_mapping(mapping, aug_dim, dim, num_heads)
        self.norm = nn.LayerNorm(dim)
        if fusion != "simple_add":
            self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        if fusion == "gated_attention":
            self.gate = nn.Parameter(torch.zeros(()))
        self.record_entropy = False  # set by the monitor: the next forward stores its entropy
        self.entropy: Tensor | None = None

    def forward(self, h: Tensor, aug: Tensor) -> Tensor:
        a = self.mapping(aug.to(h.dtype))
        if self.fusion == "simple_add":
            return self.norm(h + self.resample(a, h.shape[1]))
        q = self.norm(h) if self.fusion == "gated_attention" else h
        if self.record_entropy:  # a separate no-grad pass keeps the trained path one kernel
            self.record_entropy = False
            with torch.no_grad():
                weights = self.attn(q, a, a, need_weights=True, average_attn_weights=False)[1]
            self.entropy = attention_entropy(weights)
        out = self.attn(q, a, a, need_weights=False)[0]
        if self.fusion == "gated_attention":
            return h + torch.tanh(self.gate) * out
        return self.norm(h + out)

    def resample(self, a: Tensor, tokens: int) -> Tensor:
        """Augmenting tokens on the anchor's layout: the patch grid resized bilinearly, the
        first class token onto the anchor's first prefix token, zeros for other prefix slots."""
        b, _, d = a.shape
        side_in, side_out = _side(a.shape[1] - self.aug_prefix), _side(tokens - self.prefix)
        grid = a[:, self.aug_prefix :].transpose(1, 2).reshape(b, d, side_in, side_in)
        if side_in != side_out:
            grid = F.interpolate(grid, size=(side_out, side_out), mode="bilinear", align_corners=False)
        patches = grid.flatten(2).transpose(1, 2)
        head = a.new_zeros(b, self.prefix, d)
        if self.prefix and self.aug_prefix:
            head[:, 0] = a[:, 0]
        return torch.cat([head, patches], dim=1)


def _side(n: int) -> int:
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"calm.fusion=simple_add needs square patch grids, got {n} patches")
    return side


def attention_entropy(weights: Tensor) -> Tensor:
    """Mean entropy of the attention rows (B, heads, T_q, T_k), divided by ``log T_k``: 0 when
    every anchor token reads one augmenting token, 1 when it reads all of them evenly."""
    p = weights.float().clamp_min(1e-12)
    h = -(p * p.log()).sum(-1).mean()
    return h / math.log(weights.shape[-1]) if weights.shape[-1] > 1 else h

"""Flamingo's GATED XATTN-DENSE block, shared by every family that feeds vision into an LM's
own layers (layer fusion's E_M / I_M, the Q-Former captioner's decoder).

``h + tanh(α)·MHA(LN(h), v, v)`` then ``h + tanh(β)·FFN(LN(h))`` with α = β = 0 at
initialisation: the block adds exactly zero, so the model it is inserted into runs unchanged
until the gates open. At α = 0 only the gates receive gradient on the first step; everything
behind them learns once they move.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def check_heads(dim: int, num_heads: int, where: str) -> None:
    if num_heads < 1 or dim % num_heads:
        raise ValueError(f"{where}: num_heads={num_heads} must divide the width {dim}")


class GatedCrossAttention(nn.Module):
    """Queries ``h`` (B, T, D) attend over ``visual`` (B, S, D); ``ff_mult=0`` drops the FFN.

    With ``record = True`` the head-averaged attention (B, T, S) of the last call is kept in
    ``last_attention`` for analysis; off by default, since it costs the fused SDPA kernel.
    """

    def __init__(self, dim: int, num_heads: int, ff_mult: int = 4):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.attn_gate = nn.Parameter(torch.zeros(()))
        self.ff = None
        if ff_mult:
            self.ff = nn.Sequential(
                nn.LayerNorm(dim), nn.Linear(dim, ff_mult * dim), nn.GELU(), nn.Linear(ff_mult * dim, dim)
            )
            self.ff_gate = nn.Parameter(torch.zeros(()))
        self.record = False
        self.last_attention: Tensor | None = None

    def forward(self, h: Tensor, visual: Tensor) -> Tensor:
        visual = visual.to(h.dtype)
        out, weights = self.attn(self.norm(h), visual, visual, need_weights=self.record)
        if self.record:
            self.last_attention = weights.detach()
        h = h + torch.tanh(self.attn_gate) * out
        if self.ff is not None:
            h = h + torch.tanh(self.ff_gate) * self.ff(h)
        return h

    def gates(self) -> dict[str, Tensor]:
        out = {"attn": torch.tanh(self.attn_gate.detach())}
        if self.ff is not None:
            out["ff"] = torch.tanh(self.ff_gate.detach())
        return out

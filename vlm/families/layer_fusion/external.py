"""External fusion (E_D, E_M): the selected layers are fused before the projector, so the LLM
sees one image-token sequence as in plain LLaVA.

- ``E_D`` concatenates the streams and the base feature along channels; the projector
  (``mlp2x_gelu``) is widened to ``(k+1)·D_v`` inputs and does the fusing.
- ``E_M`` lets the base feature attend over the tokens of the other streams through a gated
  cross-attention block (zero gate: exactly the base feature at initialisation) and passes the
  result to the usual ``D_v``-wide projector. The paper's module uses deformable attention, a
  custom CUDA op; this is standard multi-head attention over all tokens of all streams, with a
  learned per-stream embedding so the keys say which layer they come from.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vlm.core.gated import GatedCrossAttention, check_heads

STRATEGIES = ("E_D", "E_M")


class ExternalFusion(nn.Module):
    """``streams`` (k of (B, P, D_v), one per entry of the layer set) and ``base`` (B, P, D_v)
    -> the projector's input, (B, P, out_dim)."""

    def __init__(self, strategy: str, num_streams: int, dim: int, num_heads: int = 8, ff_mult: int = 0):
        super().__init__()
        if strategy not in STRATEGIES:
            raise ValueError(f"external fusion strategy {strategy!r}: choose from {', '.join(STRATEGIES)}")
        self.strategy = strategy
        self.out_dim = dim * (num_streams + 1) if strategy == "E_D" else dim
        if strategy == "E_M":
            check_heads(dim, num_heads, "fusion=E_M")
            self.stream_norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(num_streams))
            self.stream_embed = nn.Parameter(torch.zeros(num_streams, dim))
            self.block = GatedCrossAttention(dim, num_heads, ff_mult)

    def forward(self, streams: list[Tensor], base: Tensor) -> Tensor:
        if self.strategy == "E_D":
            return torch.cat([*streams, base], dim=-1)
        keys = [norm(s) + e for norm, s, e in zip(self.stream_norms, streams, self.stream_embed, strict=True)]
        return self.block(base, torch.cat(keys, dim=1))

    def gates(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.block.gates().items()} if self.strategy == "E_M" else {}

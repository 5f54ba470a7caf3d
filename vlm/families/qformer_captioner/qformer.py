"""The Q-Former: a fixed number of learned query tokens that read the image by cross-attention
(Li et al. 2023, BLIP-2 Sec. 3.1), plus one global context token.

The global token starts from the image's own summary (the tower's CLS state, projected; the
patch mean for towers without one), so the queries can specialise on parts of the image
while one token carries the whole. ``global_token=learned`` makes it a plain extra query.
Output row 0 is the global token, rows 1..Q the queries.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vlm.core.gated import check_heads

GLOBAL_TOKENS = ("cls", "learned")


class QFormerLayer(nn.Module):
    """Pre-LN: self-attention among the tokens, cross-attention to the image (if this layer
    has it), FFN. ``record`` keeps the cross-attention (B, T, N), heads averaged."""

    def __init__(self, width: int, num_heads: int, cross: bool, ff_mult: int, dropout: float):
        super().__init__()
        self.self_norm = nn.LayerNorm(width)
        self.self_attn = nn.MultiheadAttention(width, num_heads, dropout=dropout, batch_first=True)
        self.cross_norm = nn.LayerNorm(width) if cross else None
        self.cross_attn = (
            nn.MultiheadAttention(width, num_heads, dropout=dropout, batch_first=True) if cross else None
        )
        self.ff = nn.Sequential(
            nn.LayerNorm(width),
            nn.Linear(width, ff_mult * width),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(ff_mult * width, width),
        )
        self.record = False
        self.last_attention: Tensor | None = None

    def forward(self, h: Tensor, image: Tensor) -> Tensor:
        x = self.self_norm(h)
        h = h + self.self_attn(x, x, x, need_weights=False)[0]
        if self.cross_attn is not None:
            out, weights = self.cross_attn(self.cross_norm(h), image, image, need_weights=self.record)
            if self.record:
                self.last_attention = weights.detach()
            h = h + out
        return h + self.ff(h)


class QFormer(nn.Module):
    """(B, N, D_v) image states -> (B, 1 + num_queries, width).

    ``cross_attention_every``: layers 0, k, 2k, ... read the image (BLIP-2 uses 2); the
    others only mix the tokens among themselves.
    """

    def __init__(
        self,
        vision_width: int,
        width: int = 768,
        depth: int = 6,
        num_heads: int = 12,
        num_queries: int = 32,
        cross_attention_every: int = 1,
        ff_mult: int = 4,
        dropout: float = 0.0,
        global_token: str = "cls",
    ):
        super().__init__()
        check_heads(width, num_heads, "qformer")
        if num_queries < 1 or depth < 1 or cross_attention_every < 1:
            raise ValueError(
                f"qformer: num_queries={num_queries}, depth={depth} and "
                f"cross_attention_every={cross_attention_every} must all be >= 1"
            )
        if global_token not in GLOBAL_TOKENS:
            raise ValueError(f"qformer.global_token={global_token!r}: choose from {', '.join(GLOBAL_TOKENS)}")
        self.num_queries = num_queries
        self.width = width
        self.global_token = global_token
        self.queries = nn.Parameter(torch.randn(1, num_queries, width) * 0.02)
        self.global_embed = nn.Parameter(torch.zeros(1, 1, width))
        self.global_proj = nn.Linear(vision_width, width) if global_token == "cls" else None
        self.image_norm = nn.LayerNorm(vision_width)
        self.image_proj = nn.Linear(vision_width, width)
        self.layers = nn.ModuleList(
            QFormerLayer(width, num_heads, i % cross_attention_every == 0, ff_mult, dropout)
            for i in range(depth)
        )
        self.norm = nn.LayerNorm(width)

    @property
    def num_tokens(self) -> int:
        return 1 + self.num_queries

    def forward(self, image: Tensor, summary: Tensor | None = None) -> Tensor:
        """``image`` (B, N, D_v): every token the queries may read; ``summary`` (B, D_v): the
        image's global state (CLS), used for the global token when ``global_token=cls``."""
        image = self.image_norm(image)
        glob = self.global_embed.expand(image.shape[0], -1, -1)
        if self.global_proj is not None:
            summary = image.mean(1) if summary is None else self.image_norm(summary)
            glob = glob + self.global_proj(summary)[:, None]
        h = torch.cat([glob, self.queries.expand(image.shape[0], -1, -1)], dim=1)
        kv = self.image_proj(image)
        for layer in self.layers:
            h = layer(h, kv)
        return self.norm(h)

    def record(self, on: bool) -> None:
        for layer in self.layers:
            layer.record = on

"""How the decoder sees the Q-Former's tokens.

``cross_attention``: a tanh-gated cross-attention block (α = 0 at init) in front of every
k-th decoder block; every text position attends over the projected Q-Former tokens inside the
LM, unlike a single attention layer after the LM's last state, which no LM layer ever sees.
GPT-Neo has no cross-attention in transformers and GPT-2's is a different module per class,
so one mechanism serves all: the core's :class:`~vlm.core.injection.DecoderInjection`, a
forward pre-hook on each chosen block's input.

``prefix``: the tokens are projected to the LM width and take the ``<image>`` span in front
of the caption (BLIP-2's LLM input); the LM itself is untouched.
"""

from __future__ import annotations

from torch import Tensor, nn

from vlm.core.gated import GatedCrossAttention, check_heads
from vlm.core.injection import DecoderInjection, per_beam

MODES = ("cross_attention", "prefix")


class CrossAttentionConditioning(DecoderInjection):
    """``proj``: Q-Former width -> LM width; ``xattn["<i>"]`` before decoder block i."""

    def __init__(
        self, qformer_width: int, llm_width: int, llm_depth: int, every: int, num_heads: int, ff_mult: int
    ):
        super().__init__()
        check_heads(llm_width, num_heads, "conditioning=cross_attention")
        if not 1 <= every <= llm_depth:
            raise ValueError(f"cross_attention_every={every} must be in 1..{llm_depth} (the decoder's depth)")
        self.proj = nn.Linear(qformer_width, llm_width)
        self.layers = list(range(0, llm_depth, every))
        self.xattn = nn.ModuleDict(
            {str(i): GatedCrossAttention(llm_width, num_heads, ff_mult) for i in self.layers}
        )

    def forward(self, tokens: Tensor) -> Tensor:
        """Q-Former tokens (B, T, D_q) -> the keys/values every block reads (B, T, D_llm)."""
        return self.proj(tokens)

    def set_tokens(self, tokens: Tensor | None) -> None:
        """The batch's Q-Former tokens (B, T, D_q), projected once as the context. ``None``:
        the plain LM."""
        self.set_context(None if tokens is None else self(tokens))

    def inject(self, layer: int, hidden: Tensor) -> Tensor:
        visual = self.context  # (B, T, D_llm), one image per caption
        return self.xattn[str(layer)](hidden, per_beam(visual, hidden, len(visual)))

    def gates(self) -> dict[str, float]:
        """tanh of each gate, ``<block>_attn`` (and ``<block>_ff``)."""
        return {f"{i}_{k}": float(v) for i, m in self.xattn.items() for k, v in m.gates().items()}

    def record(self, on: bool) -> None:
        for m in self.xattn.values():
            m.record = on


class PrefixConditioning(nn.Module):
    """Q-Former tokens -> LM input embeddings for the ``<image>`` span."""

    def __init__(self, qformer_width: int, llm_width: int):
        super().__init__()
        self.proj = nn.Linear(qformer_width, llm_width)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.proj(tokens)

    def gates(self) -> dict[str, float]:
        return {}

    def record(self, on: bool) -> None:
        """Prefix tokens are read by the LM's own self-attention: nothing of ours to record."""

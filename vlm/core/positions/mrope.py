"""M-RoPE (Qwen2-VL, Wang et al. 2024, Sec. 2.1) on a zoo LLM, without forking its modeling code.

The LLM's decoder already hands its ``position_ids`` to ``base_model.rotary_emb`` and applies
the (cos, sin) it returns to queries and keys. Swapping that one module for
:class:`MultimodalRotaryEmbedding` is all M-RoPE needs: given (3, B, T) ids it computes the
angles of each row and takes the rotary frequencies section by section from the temporal, the
height and the width row (``sections`` in frequency pairs, Qwen2-VL's ``mrope_section``:
16, 24, 24 at head_dim 128). Given (B, T) ids it is the LLM's own RoPE. The swapped module holds
only non-persistent buffers, so state dicts, LoRA and ``save_pretrained`` are unchanged.

Covered: the LLMs whose decoder applies standard rotary cos/sin of shape (B, T, head_dim)
from ``base_model.rotary_emb`` with the default RoPE (``ROTARY_MODEL_TYPES``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

ROTARY_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def default_sections(head_dim: int) -> tuple[int, int, int]:
    """Qwen2-VL's 2:3:3 split of the ``head_dim / 2`` frequency pairs (16, 24, 24 at 128)."""
    pairs = head_dim // 2
    t = pairs // 4
    h = (pairs - t) // 2
    return t, h, pairs - t - h


class MultimodalRotaryEmbedding(nn.Module):
    def __init__(self, rope: nn.Module, sections: Sequence[int]):
        super().__init__()
        self.rope = rope
        pairs = rope.inv_freq.numel()
        if len(sections) != 3 or sum(sections) != pairs or min(sections) < 0:
            raise ValueError(
                f"image_positions.sections={list(sections)}: give three counts (temporal, height, width) "
                f"of rotary frequency pairs that sum to head_dim/2 = {pairs}"
            )
        self.sections = tuple(int(s) for s in sections)
        row = torch.cat([torch.full((n,), i) for i, n in enumerate(self.sections)])
        self.register_buffer("row", row, persistent=False)  # which id row each frequency reads

    def forward(self, x: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        if position_ids.ndim == 2:
            return self.rope(x, position_ids)
        inv_freq = self.rope.inv_freq.to(device=x.device, dtype=torch.float)
        freqs = position_ids[..., None].float() * inv_freq  # (3, B, T, pairs): the LLM's own arithmetic
        index = self.row.view(1, 1, 1, -1).expand(1, *freqs.shape[1:])
        freqs = freqs.gather(0, index).squeeze(0)
        emb = torch.cat((freqs, freqs), dim=-1)
        scale = self.rope.attention_scaling
        return (emb.cos() * scale).to(x.dtype), (emb.sin() * scale).to(x.dtype)


def install_mrope(llm: nn.Module, sections: Sequence[int] | None) -> tuple[int, int, int]:
    """Swap ``llm``'s rotary embedding for M-RoPE (idempotent); returns the sections used."""
    config = llm.config
    model_type = getattr(config, "model_type", type(llm).__name__)
    base = llm.base_model
    rope = getattr(base, "rotary_emb", None)
    if model_type not in ROTARY_MODEL_TYPES or rope is None:
        raise ValueError(
            f"image_positions=mrope needs a rotary LLM ({', '.join(ROTARY_MODEL_TYPES)}); "
            f"llm is {model_type}: use image_positions=flat, sincos2d or learned2d"
        )
    if isinstance(rope, MultimodalRotaryEmbedding):
        rope = rope.rope
    rope_type = getattr(rope, "rope_type", "default")
    if rope_type != "default":
        raise ValueError(f"image_positions=mrope takes the default RoPE; llm uses rope_type={rope_type!r}")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    sections = tuple(sections) if sections is not None else default_sections(head_dim)
    base.rotary_emb = MultimodalRotaryEmbedding(rope, sections)
    return base.rotary_emb.sections

"""Internal fusion (I_D, I_M): visual features of chosen encoder blocks enter chosen LLM layers.

Each block of the layer set has its own projector to the LLM width and a target layer at the
same relative depth (:func:`~vlm.families.layer_fusion.layers.llm_target`); the features enter
through the core's :class:`~vlm.core.injection.DecoderInjection` (pre-hooks, no forked LLM).

- ``I_D`` adds the projected features to the image-token span, at prefill only: decode steps
  carry no image tokens, so the KV cache already holds what the injection changed.
- ``I_M`` runs a gated cross-attention block (queries: every token; keys/values: the target's
  projected features) before the layer. It runs at every decode step too, as it did on every
  token in training; skipping it there would decode with a different model than was trained.

The visual context lives from one ``embed_inputs`` to the next, so a gradient-checkpointed layer
that recomputes in the backward pass sees the same features it saw going forward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from vlm.core.gated import GatedCrossAttention, check_heads
from vlm.core.injection import DecoderInjection, per_beam
from vlm.families.layer_fusion.layers import llm_target

STRATEGIES = ("I_D", "I_M")


@dataclass
class _Context:
    streams: list[Tensor]  # per block of the set: (B_img, P, D_v) encoder features
    is_image: Tensor | None = None  # (B, T) image-token positions of the prompt


class InternalFusion(DecoderInjection):
    """Per-block projectors (``projectors[i]`` for ``blocks[i]``) and, for ``I_M``, one gated
    cross-attention block per target layer (``xattn["<layer>"]``)."""

    def __init__(
        self,
        strategy: str,
        blocks: list[int],
        encoder_depth: int,
        llm_depth: int,
        make_projector: Callable[[], nn.Module],
        llm_width: int,
        num_heads: int,
        ff_mult: int = 4,
    ):
        super().__init__()
        if strategy not in STRATEGIES:
            raise ValueError(f"internal fusion strategy {strategy!r}: choose from {', '.join(STRATEGIES)}")
        self.strategy = strategy
        self.blocks = list(blocks)
        self.targets = [llm_target(b, encoder_depth, llm_depth) for b in self.blocks]
        self.projectors = nn.ModuleList(make_projector() for _ in self.blocks)
        self.xattn = nn.ModuleDict()
        if strategy == "I_M":
            check_heads(llm_width, num_heads, "fusion=I_M")
            for t in dict.fromkeys(self.targets):
                self.xattn[str(t)] = GatedCrossAttention(llm_width, num_heads, ff_mult)

    # -- per forward ----------------------------------------------------------------------
    def set_streams(self, streams: list[Tensor]) -> None:
        self.set_context(_Context(streams))

    def set_image_mask(self, is_image: Tensor) -> None:
        if self.context is not None:
            self.context.is_image = is_image

    def visual(self, target: int) -> Tensor:
        """Projected features of the blocks that target this layer: summed for I_D (one value
        per image token), concatenated along tokens for I_M (keys/values)."""
        feats = [
            p(s)
            for p, s, t in zip(self.projectors, self.context.streams, self.targets, strict=True)
            if t == target
        ]
        return torch.stack(feats).sum(0) if self.strategy == "I_D" else torch.cat(feats, dim=1)

    def inject(self, layer: int, hidden: Tensor) -> Tensor:
        is_image = self.context.is_image
        if is_image is None:  # features encoded, image positions not yet known
            return hidden
        if self.strategy == "I_D":
            if hidden.shape[1] != is_image.shape[1]:  # a decode step: no image tokens in it
                return hidden
            add = per_beam(self.visual(layer).to(hidden.dtype), hidden, len(is_image))
            mask = per_beam(is_image, hidden, len(is_image))[..., None]
            return hidden + torch.zeros_like(hidden).masked_scatter(mask, add.reshape(-1, add.shape[-1]))
        visual = per_beam(self.visual(layer), hidden, len(is_image))
        rows = per_beam(is_image.any(1), hidden, len(is_image))
        block = self.xattn[str(layer)]
        if bool(rows.all()):
            return block(hidden, visual)
        index = rows.nonzero().squeeze(1)  # text-only samples in the batch keep their states
        return hidden.index_copy(0, index, block(hidden[index], visual))

    def gates(self) -> dict[str, float]:
        """tanh of every I_M gate, ``<layer>_attn`` and ``<layer>_ff``: whether fusion opened."""
        return {f"{t}_{k}": float(v) for t, m in self.xattn.items() for k, v in m.gates().items()}

"""Internal fusion (I_D, I_M): visual features of chosen encoder blocks enter chosen LLM layers.

Each block of the layer set has its own projector to the LLM width and a target layer at the
same relative depth (:func:`~vlm.families.layer_fusion.layers.llm_target`). The zoo's HF
decoder layers are not replaced or forked: a forward pre-hook on each target layer changes
the hidden states it receives, so checkpoints, LoRA and ``save_pretrained`` see the plain LLM.

- ``I_D`` adds the projected features to the image-token span, at prefill only: decode steps
  carry no image tokens, so the KV cache already holds what the injection changed.
- ``I_M`` runs a gated cross-attention block (queries: every token; keys/values: the target's
  projected features) before the layer. It runs at every decode step too, as it did on every
  token in training; skipping it there would decode with a different model than was trained.

The visual context lives from one ``embed`` to the next, so a gradient-checkpointed layer that
recomputes in the backward pass sees the same features it saw going forward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from vlm.core.gated import GatedCrossAttention, check_heads
from vlm.families.layer_fusion.layers import llm_target

STRATEGIES = ("I_D", "I_M")


@dataclass
class _Context:
    streams: list[Tensor]  # per block of the set: (B_img, P, D_v) encoder features
    is_image: Tensor | None = None  # (B, T) image-token positions of the prompt


class InternalFusion(nn.Module):
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
        self._ctx: _Context | None = None
        self._handles: list = []

    def attach(self, layers: nn.ModuleList) -> None:
        """Hook the target decoder layers (once; the hooks do nothing without a context)."""
        for t in dict.fromkeys(self.targets):
            hook = self._hook_for(t)
            self._handles.append(layers[t].register_forward_pre_hook(hook, with_kwargs=True))

    # -- per forward ----------------------------------------------------------------------
    def set_streams(self, streams: list[Tensor]) -> None:
        self._ctx = _Context(streams)

    def set_image_mask(self, is_image: Tensor) -> None:
        if self._ctx is not None:
            self._ctx.is_image = is_image

    def clear(self) -> None:
        self._ctx = None

    def visual(self, target: int) -> Tensor:
        """Projected features of the blocks that target this layer: summed for I_D (one value
        per image token), concatenated along tokens for I_M (keys/values)."""
        feats = [
            p(s)
            for p, s, t in zip(self.projectors, self._ctx.streams, self.targets, strict=True)
            if t == target
        ]
        return torch.stack(feats).sum(0) if self.strategy == "I_D" else torch.cat(feats, dim=1)

    def _hook_for(self, target: int):
        def hook(module, args, kwargs):
            ctx = self._ctx
            if ctx is None or ctx.is_image is None:
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            new = self._inject(target, hidden, ctx.is_image)
            if new is hidden:
                return None
            if args:
                return (new, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": new}

        return hook

    def _inject(self, target: int, hidden: Tensor, is_image: Tensor) -> Tensor:
        beams = hidden.shape[0] // is_image.shape[0]  # generate() expands each prompt num_beams times
        if self.strategy == "I_D":
            if hidden.shape[1] != is_image.shape[1]:  # a decode step: no image tokens in it
                return hidden
            add = self.visual(target).to(hidden.dtype).repeat_interleave(beams, 0)
            mask = is_image.repeat_interleave(beams, 0)[..., None]
            return hidden + torch.zeros_like(hidden).masked_scatter(mask, add.reshape(-1, add.shape[-1]))
        visual = self.visual(target).repeat_interleave(beams, 0)
        rows = is_image.any(1).repeat_interleave(beams, 0)
        block = self.xattn[str(target)]
        if bool(rows.all()):
            return block(hidden, visual)
        index = rows.nonzero().squeeze(1)  # text-only samples in the batch keep their states
        return hidden.index_copy(0, index, block(hidden[index], visual))

    def gates(self) -> dict[str, float]:
        """tanh of every I_M gate, ``<layer>_attn`` and ``<layer>_ff``: whether fusion opened."""
        return {f"{t}_{k}": float(v) for t, m in self.xattn.items() for k, v in m.gates().items()}

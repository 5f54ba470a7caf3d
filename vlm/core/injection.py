"""Handing vision features to chosen decoder layers of an HF language model, without forking it.

The zoo's decoder layers are not replaced: a forward pre-hook on each target layer rewrites the
hidden states it receives. No modeling file is forked and no block is swapped, so the LLM's
state dict, ``save_pretrained`` and LoRA see the plain LLM, and a gradient-checkpointed layer
that recomputes in the backward pass runs the hook again on the same context.

A subclass (layer fusion's I_D / I_M, the captioner's cross-attention conditioning) says what a
layer's input becomes (:meth:`DecoderInjection.inject`); the model sets the batch's context
before the LLM runs (it lives until the next batch, so KV-cached decode steps see it too) and
clears it for text-only input.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial
from typing import Any

from torch import Tensor, nn


class DecoderInjection(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.context: Any = None
        self._handles: list = []

    def attach(self, layers: nn.ModuleList, targets: Iterable[int]) -> None:
        """Hook ``layers[t]`` for each target (once each; again after :meth:`detach`)."""
        self.detach()
        for t in dict.fromkeys(targets):
            hook = partial(self._pre_hook, t)
            self._handles.append(layers[t].register_forward_pre_hook(hook, with_kwargs=True))

    def detach(self) -> None:
        """Remove the hooks: the LLM is the plain LLM again."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def set_context(self, context: Any) -> None:
        self.context = context

    def clear(self) -> None:
        self.context = None

    def inject(self, layer: int, hidden: Tensor) -> Tensor:
        """Layer ``layer``'s input (B·beams, T, D) with the context applied; ``hidden`` itself
        when there is nothing to change."""
        raise NotImplementedError

    def _pre_hook(self, layer: int, module: nn.Module, args: tuple, kwargs: dict):
        if self.context is None:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        new = self.inject(layer, hidden)
        if new is hidden:
            return None
        if args:
            return (new, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": new}


def per_beam(x: Tensor, hidden: Tensor, prompts: int) -> Tensor:
    """``x`` repeated for beam search: ``generate`` expands each of the batch's ``prompts`` into
    its ``num_beams`` consecutive rows of ``hidden`` (one row outside beam search)."""
    return x.repeat_interleave(hidden.shape[0] // prompts, 0)

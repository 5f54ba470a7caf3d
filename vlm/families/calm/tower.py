"""The CALM composite tower: anchor and augmenting towers joined by composition modules.

One explicit loop over the anchor's blocks (no forward hooks): after block ``l`` in the
composition layers, the module fuses the augmenting tower's state at the same relative depth
and the fused state replaces the anchor's, so every later anchor block sees it.

Freezing that holds: the augmenting tower, and the anchor blocks before the first
composition layer, run without autograd when frozen (nothing before the first module can
receive a gradient). Gradient checkpointing recomputes the anchor blocks and modules after
it with non-reentrant checkpoints, which pass gradients to the modules even though every
input tensor of a segment is frozen: the reentrant variant gives them none.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from vlm.core.recipes import is_frozen
from vlm.families.calm.composition import CompositionModule
from vlm.families.calm.layers import augmenting_layer, composition_layers


class CalmTower(nn.Module):
    """Looks like the anchor to the LLaVA core (width, tokens, blocks, image spec); its
    ``states`` takes ``{"anchor": pixels, "augmenting": pixels}``.

    ``layers`` are the composition layers the modules sit at; layers past ``output_layer``
    (the one the LLaVA core reads) could never change the features, so no module is built
    there and ``skipped`` names them.
    """

    def __init__(
        self,
        anchor: nn.Module,
        augmenting: nn.Module,
        num_layers: int = 4,
        mapping: str = "linear",
        fusion: str = "cross_attention",
        num_heads: int = 8,
        output_layer: int | None = None,
    ):
        super().__init__()
        self.anchor = anchor
        self.augmenting = augmenting
        layers = composition_layers(anchor.depth, num_layers)
        output_layer = output_layer or anchor.depth
        self.layers = [layer for layer in layers if layer <= output_layer]
        self.skipped = [layer for layer in layers if layer > output_layer]
        self.pairs = {layer: augmenting_layer(layer, anchor.depth, augmenting.depth) for layer in self.layers}
        self.calm = nn.ModuleDict(
            {
                str(layer): CompositionModule(
                    anchor.hidden_size,
                    augmenting.hidden_size,
                    mapping,
                    fusion,
                    num_heads,
                    anchor.num_prefix_tokens,
                    augmenting.num_prefix_tokens,
                )  # fmt: skip
                for layer in self.layers
            }
        )
        self.gradient_checkpointing = False

    # -- what the LLaVA core reads: the anchor's shape -----------------------------------------
    name = property(lambda self: f"calm({self.anchor.name}+{self.augmenting.name})")
    image_spec = property(lambda self: self.anchor.image_spec)
    hidden_size = property(lambda self: self.anchor.hidden_size)
    num_prefix_tokens = property(lambda self: self.anchor.num_prefix_tokens)
    num_patches = property(lambda self: self.anchor.num_patches)
    depth = property(lambda self: self.anchor.depth)
    blocks = property(lambda self: self.anchor.blocks)

    def gradient_checkpointing_enable(self) -> None:
        self.gradient_checkpointing = True

    @property
    def augmenting_depth_read(self) -> int:
        """The deepest augmenting block a module reads: later ones never run."""
        return max(self.pairs.values(), default=0)

    def augmenting_states(self, pixel_values: Tensor) -> dict[int, Tensor]:
        """The augmenting states the modules read, running only the blocks they need."""
        tower = self.augmenting
        needed = set(self.pairs.values())
        ctx = torch.no_grad() if is_frozen(tower) else contextlib.nullcontext()
        with ctx:
            h = tower.embed(pixel_values.to(next(tower.parameters()).dtype))
            out = {}
            for i in range(self.augmenting_depth_read):
                h = tower.run_block(i, h)
                if i + 1 in needed:
                    out[i + 1] = h
        return out

    def states(self, pixel_values: dict[str, Tensor], upto: int) -> list[Tensor]:
        """[h0, ..., h_upto] of the anchor, each composition layer's state replaced by the
        fused one."""
        if not isinstance(pixel_values, dict):
            raise TypeError("the CALM tower needs {'anchor': ..., 'augmenting': ...} pixel values")
        aug = self.augmenting_states(pixel_values["augmenting"])
        anchor = self.anchor
        live = [layer for layer in self.layers if layer <= upto]
        first = live[0] if live else upto + 1
        frozen = is_frozen(anchor)
        with torch.no_grad() if frozen else contextlib.nullcontext():
            h = anchor.embed(pixel_values["anchor"].to(next(anchor.parameters()).dtype))
        states = [h]
        for i in range(upto):
            layer = i + 1
            with torch.no_grad() if frozen and layer < first else contextlib.nullcontext():
                h = self._run(anchor.run_block, i, h)
            if layer in self.pairs:
                h = self._run(self.calm[str(layer)], h, aug[self.pairs[layer]])
            states.append(h)
        return states

    def _run(self, fn, *args):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

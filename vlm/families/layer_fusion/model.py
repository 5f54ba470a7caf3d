"""The LLaVA core with multi-layer visual features (Lin et al. 2025, *Multi-Layer Visual
Feature Fusion in Multimodal LLMs*): one tower pass yields every block the set needs, the base
feature (``select_layer``) always among them.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vlm.core.llava import LlavaModel
from vlm.core.zoo.llms import decoder_layers
from vlm.families.layer_fusion.internal import InternalFusion
from vlm.families.layer_fusion.layers import LayerSet


class LayerFusionModel(LlavaModel):
    """``fusion`` is an ``ExternalFusion`` (its output feeds ``connector``) or an
    :class:`InternalFusion` (``connector`` takes the base feature; the rest enters the LLM)."""

    def __init__(
        self, vision_tower, connector, llm, image_token_id, layer_set: LayerSet, fusion: nn.Module, **kw
    ):
        super().__init__(vision_tower, connector, llm, image_token_id, **kw)
        self.layer_set = layer_set
        self.fusion = fusion
        self.internal = isinstance(fusion, InternalFusion)
        if self.internal:
            fusion.attach(decoder_layers(llm))

    def encode_images(self, pixel_values: Tensor) -> Tensor:
        states = self.tower_states(pixel_values, max(self.select_index, self.layer_set.deepest))
        base = self.select(states[self.select_index])
        if self.internal:  # each block on its own: block-wise onto the LLM layers
            self.fusion.set_streams([self.select(states[b]) for b in self.layer_set.blocks])
            return self.connector(base)
        streams = [self.select(torch.stack([states[b] for b in g]).mean(0)) for g in self.layer_set.groups]
        return self.connector(self.fusion(streams, base))

    def embed(self, input_ids: Tensor, pixel_values: Tensor | None) -> Tensor:
        """Also hands the internal fusion this batch's image-token positions; a text-only batch
        clears the previous batch's features."""
        if self.internal:
            self.fusion.clear()
        embeds = super().embed(input_ids, pixel_values)
        if self.internal:
            self.fusion.set_image_mask(input_ids == self.image_token_id)
        return embeds

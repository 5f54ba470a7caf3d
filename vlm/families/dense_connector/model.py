"""The LLaVA core with a connector that may read several tower layers: TinyCLIP-ViT-40M ->
connector -> Llama-3.2-1B in the seed study, any tower and LLM of the zoo here.

With a one-layer connector (``linear``, ``mlp2x_gelu``, the seed's ``mlp4x_gelu``) this is
plain LLaVA; with a :class:`DenseConnector` one tower pass yields every state it reads.
Recipe parts are LLaVA's: stage 1 trains ``connector``, stage 2 adds ``llm``.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from vlm.core.builder import LlavaParts
from vlm.core.hf_llava import NotExportable
from vlm.core.llava import LlavaModel
from vlm.families.dense_connector.connectors import DenseConnector


def reads_layers(make_connector: Any) -> bool:
    """Whether a ``_partial_`` connector config builds a :class:`DenseConnector`."""
    func = getattr(make_connector, "func", None)
    return isinstance(func, type) and issubclass(func, DenseConnector)


class DenseConnectorModel(LlavaModel):
    @classmethod
    def make_connector(cls, parts: LlavaParts) -> nn.Module:
        """A dense connector is completed with the tower's depth, which fixes the states it reads."""
        if not reads_layers(parts.make_connector):
            return parts.connector()
        tower = parts.tower
        return parts.make_connector(tower.hidden_size, parts.llm_width, tower_depth=tower.depth)

    @property
    def dense(self) -> bool:
        return isinstance(self.connector, DenseConnector)

    @property
    def deepest_state(self) -> int:
        return max(self.select_index, self.connector.deepest) if self.dense else self.select_index

    def hf_llava_layout(self) -> tuple[list[int], nn.Module]:
        """``dense_sci`` is HF LLaVA's list ``vision_feature_layer``: the final feature, then the
        two middle states, along channels into a Linear-GELU-Linear. ``sti`` (along tokens) and
        ``dci`` (group means) have no place there."""
        if not self.dense:
            return super().hf_llava_layout()
        if self.connector.mode != "sci":
            how = (
                "joins pooled states along tokens"
                if self.connector.mode == "sti"
                else "averages groups of states"
            )
            raise NotExportable(
                f"connector=dense_{self.connector.mode} {how}, which HF's LLaVA (single hidden states "
                "concatenated along channels) cannot: connector=dense_sci or mlp2x_gelu exports"
            )
        return [self.select_index, *self.connector.layers], self.connector.mlp

    def encode_images(self, pixel_values: Tensor) -> Tensor:
        if not self.dense:
            return super().encode_images(pixel_values)
        states = [self.select(h) for h in self.tower_states(pixel_values, self.deepest_state)]
        return self.connector(states[self.select_index], states)

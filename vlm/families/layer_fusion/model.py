"""The LLaVA core with multi-layer visual features (Lin et al. 2025, *Multi-Layer Visual
Feature Fusion in Multimodal LLMs*): one tower pass yields every block the set needs, the base
feature (``select_layer``) always among them.

Recipe parts are ``vision_tower``, ``connector``, ``fusion`` (the E_M module, or the internal
projectors and I_M blocks) and ``llm``. Unless ``tune.fusion`` is given, the fusion trains
exactly when the connector does, so the stock stages read as the paper's: stage 1 (pretrain)
trains projectors and fusion modules, stage 2 (finetune) adds the LLM.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from vlm.core.builder import build_parts
from vlm.core.hf_llava import NotExportable
from vlm.core.llava import LlavaModel
from vlm.core.zoo.llms import decoder_layers
from vlm.families.layer_fusion.external import STRATEGIES as EXTERNAL
from vlm.families.layer_fusion.external import ExternalFusion
from vlm.families.layer_fusion.internal import STRATEGIES as INTERNAL
from vlm.families.layer_fusion.internal import InternalFusion
from vlm.families.layer_fusion.layers import LayerSet, resolve


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
            fusion.attach(decoder_layers(llm), fusion.targets)

    @classmethod
    def from_config(
        cls,
        tokenizer: Any,
        vision_tower: dict,
        llm: dict,
        connector: dict,
        fusion: dict,
        layers: dict,
        select_layer: int = -2,
        select_feature: str = "patch",
        image_positions: dict | None = None,
    ) -> LayerFusionModel:
        """``fusion``: ``strategy`` plus the strategy's options; ``layers``: the ``conf/layers``
        set (``name``, ``blocks``, ``reference``). External strategies widen the projector to
        what they output; internal ones give each injected block a projector of its own."""
        p = build_parts(tokenizer, vision_tower, llm, connector, select_layer, select_feature)
        options = dict(fusion)
        strategy = options.pop("strategy")
        tower = p.tower
        layer_set = resolve(
            layers["name"], layers["blocks"], tower.depth, layers.get("reference"), tower.name
        )
        if strategy in EXTERNAL:
            module = ExternalFusion(strategy, len(layer_set.groups), tower.hidden_size, **options)
            connector_module = p.connector(module.out_dim)
        elif strategy in INTERNAL:
            heads = options.pop("num_heads", None) or p.llm.config.num_attention_heads
            depth = len(decoder_layers(p.llm))
            module = InternalFusion(
                strategy, layer_set.blocks, tower.depth, depth, p.connector, p.llm_width, heads, **options
            )
            connector_module = p.connector()
        else:
            raise ValueError(f"fusion.strategy={strategy!r}: choose from {', '.join(EXTERNAL + INTERNAL)}")
        return cls(
            tower,
            connector_module,
            p.llm,
            p.image_token_id,
            layer_set=layer_set,
            fusion=module,
            select_layer=p.select_index,
            select_feature=p.select_feature,
            image_positions=image_positions,
        )

    def parts(self) -> dict[str, nn.Module]:
        return super().parts() | {"fusion": self.fusion}

    def resolve_tune(self, tune: dict) -> dict:
        tune.setdefault("fusion", tune.get("connector"))
        return super().resolve_tune(tune)

    @property
    def deepest_state(self) -> int:
        return max(self.select_index, self.layer_set.deepest)

    def hf_llava_layout(self) -> tuple[list[int], nn.Module]:
        """E_D over single blocks is HF LLaVA's list ``vision_feature_layer``: the set's states,
        then the base feature, concatenated along channels into the projector. Group means
        (``former``, ``latter``) and the modular and internal strategies have no place there."""
        fix = "fusion=E_D with a set of single blocks (layers=18, 3-18 or 3-18-23) exports"
        if self.fusion.__class__ is not ExternalFusion or self.fusion.strategy != "E_D":
            where = "inside the LLM" if self.internal else "a learned fusion module"
            raise NotExportable(
                f"fusion={self._strategy()} puts {where} that HF's LLaVA does not have: {fix}"
            )
        if any(len(g) > 1 for g in self.layer_set.groups):
            raise NotExportable(
                f"layers={self.layer_set.name} averages groups of blocks, which HF's LLaVA (single "
                f"hidden states concatenated along channels) cannot: {fix}"
            )
        return [*self.layer_set.blocks, self.select_index], self.connector

    def _strategy(self) -> str:
        return getattr(self.fusion, "strategy", type(self.fusion).__name__)

    def monitor_values(self) -> dict:
        """``fusion/gate_<name>``: tanh of each modular gate; one still at zero late in training
        means that fusion never opened."""
        return {f"fusion/gate_{k}": v for k, v in self.fusion.gates().items()}

    def encode_images(self, pixel_values: Tensor) -> Tensor:
        states = self.tower_states(pixel_values, self.deepest_state)
        base = self.select(states[self.select_index])
        if self.internal:  # each block on its own: block-wise onto the LLM layers
            self.fusion.set_streams([self.select(states[b]) for b in self.layer_set.blocks])
            return self.connector(base)
        streams = [self.select(torch.stack([states[b] for b in g]).mean(0)) for g in self.layer_set.groups]
        return self.connector(self.fusion(streams, base))

    def embed_inputs(self, input_ids: Tensor, pixel_values: Tensor | None) -> Tensor:
        """Also hands the internal fusion this batch's image-token positions; a text-only batch
        clears the previous batch's features."""
        if self.internal:
            self.fusion.clear()
        embeds = super().embed_inputs(input_ids, pixel_values)
        if self.internal:
            self.fusion.set_image_mask(input_ids == self.image_token_id)
        return embeds

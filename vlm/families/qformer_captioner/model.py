"""CLIP -> Q-Former -> decoder, on the LLaVA core: the Q-Former stands where LLaVA's connector
stands, and the decoder reads its tokens by cross-attention or as a prefix."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from vlm.core.builder import build_parts
from vlm.core.llava import LlavaModel
from vlm.core.zoo.llms import decoder_layers
from vlm.families.qformer_captioner.conditioning import (
    MODES,
    CrossAttentionConditioning,
    PrefixConditioning,
)
from vlm.families.qformer_captioner.qformer import QFormer


class QFormerCaptioner(LlavaModel):
    """``connector`` is the :class:`QFormer`; ``conditioning`` a cross-attention or prefix
    module. With cross-attention the caption carries no image tokens at all.

    Recipe parts: ``vision_tower`` (CLIP, frozen), ``qformer``, ``conditioning`` (the decoder's
    gated cross-attention blocks, or the prefix projection) and ``decoder``.
    """

    def __init__(
        self,
        vision_tower: nn.Module,
        qformer: QFormer,
        conditioning: nn.Module,
        llm: nn.Module,
        image_token_id: int,
        select_layer: int = -1,
        select_feature: str = "cls_patch",
        image_positions: dict | None = None,
    ):
        super().__init__(
            vision_tower, qformer, llm, image_token_id, select_layer, select_feature, image_positions
        )
        self.conditioning = conditioning
        self.cross = isinstance(conditioning, CrossAttentionConditioning)
        if self.cross:
            conditioning.attach(decoder_layers(llm), conditioning.layers)

    @classmethod
    def from_config(
        cls,
        tokenizer: Any,
        vision_tower: dict,
        llm: dict,
        qformer: dict,
        conditioning: dict,
        select_layer: int = -1,
        select_feature: str = "cls_patch",
        image_positions: dict | None = None,
    ) -> QFormerCaptioner:
        """``conditioning``: ``mode`` (cross_attention | prefix) plus its options; a null
        ``num_heads`` takes the decoder's head count."""
        p = build_parts(tokenizer, vision_tower, llm, None, select_layer, select_feature)
        q = QFormer(p.tower.hidden_size, **qformer)
        options = dict(conditioning)
        mode = options.pop("mode")
        if mode == "cross_attention":
            heads = options.pop("num_heads", None) or p.llm.config.num_attention_heads
            depth = len(decoder_layers(p.llm))
            cond = CrossAttentionConditioning(q.width, p.llm_width, depth, num_heads=heads, **options)
        elif mode == "prefix":
            cond = PrefixConditioning(q.width, p.llm_width, **options)
        else:
            raise ValueError(f"conditioning.mode={mode!r}: choose from {', '.join(MODES)}")
        return cls(
            p.tower, q, cond, p.llm, p.image_token_id, p.select_index, p.select_feature, image_positions
        )

    def image_layout(self) -> None:
        """The Q-Former's queries have no 2-D place: only ``image_positions=flat`` applies."""
        return None

    def parts(self) -> dict[str, nn.Module]:
        return {
            "vision_tower": self.vision_tower,
            "qformer": self.connector,
            "conditioning": self.conditioning,
            "decoder": self.llm,
        }

    def blocks(self, part: str) -> nn.ModuleList | None:
        return super().blocks({"decoder": "llm"}.get(part, part))

    def monitor_values(self) -> dict:
        """``conditioning/gate_<block>_attn``: tanh of each gate."""
        return {f"conditioning/gate_{k}": v for k, v in self.conditioning.gates().items()}

    @property
    def mode(self) -> str:
        return "cross_attention" if self.cross else "prefix"

    @property
    def num_image_tokens(self) -> int:
        return 0 if self.cross else self.connector.num_tokens

    def query_tokens(self, pixel_values: Tensor) -> Tensor:
        """(B, 3, H, W) -> Q-Former outputs (B, 1 + Q, D_q); row 0 the global token."""
        h = self.tower_states(pixel_values, self.select_index)[-1]
        summary = h[:, 0] if self.vision_tower.num_prefix_tokens else None
        return self.connector(self.select(h), summary)

    def encode_images(self, pixel_values: Tensor) -> Tensor:
        """The image as the decoder reads it (B, T, D_llm): the ``<image>`` span's embeddings
        in prefix mode, the cross-attention keys/values otherwise."""
        return self.conditioning(self.query_tokens(pixel_values))

    def embed_inputs(self, input_ids: Tensor, pixel_values: Tensor | None) -> Tensor:
        if not self.cross:
            return super().embed_inputs(input_ids, pixel_values)
        if pixel_values is not None and pixel_values.shape[0] != input_ids.shape[0]:
            raise ValueError(
                f"{input_ids.shape[0]} captions but {pixel_values.shape[0]} images: "
                "cross-attention conditioning needs one image per caption"
            )
        self.conditioning.set_tokens(None if pixel_values is None else self.query_tokens(pixel_values))
        return super().embed_inputs(input_ids, None)

    def record_attention(self, on: bool) -> None:
        """Keep the Q-Former's and the decoder's cross-attention maps of the next forward."""
        self.connector.record(on)
        self.conditioning.record(on)

"""The segmenter: a vision-language backbone whose hidden states become SAM prompts.

``prompt=seg_token`` (LISA, Lai et al. 2024): the answer holds one ``[SEG]`` per mask; the last
hidden state at each ``[SEG]`` -> TextSAMConnector -> one mask each, trained with the text CE
too. ``prompt=fused`` (the seed's flow): one hidden state per sample (the last valid token's,
or the mean over valid tokens) -> one mask. The image embedding SAM's decoder reads comes from
the backbone's patch grid through the ImageEncoderSAMConnector, or from SAM's own image
encoder (``sam.image_encoder=own``).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlm.core.model import VLMModel
from vlm.core.recipes import is_frozen
from vlm.core.tokenizer import IGNORE_INDEX, IMAGE_TOKEN
from vlm.families.sam_segmentation.backbone import Backbone, SeparateBackbone
from vlm.families.sam_segmentation.connectors import ImageEncoderSAMConnector, TextSAMConnector
from vlm.families.sam_segmentation.losses import mask_losses
from vlm.families.sam_segmentation.processor import SEG_TOKEN
from vlm.families.sam_segmentation.sam import SamHead, build_sam
from vlm.families.sam_segmentation.vlms import build_vlm_backbone

MODES, PROMPTS, POOLS, SEG_POSITIONS = (
    ("separate", "vlm"),
    ("fused", "seg_token"),
    ("last", "mean"),
    ("at", "before"),
)


def add_seg_token(tokenizer: Any) -> int:
    """``[SEG]`` as a special token, as LISA adds it; the LLM is then built (or grown) to the
    tokenizer's length. (The processor checks that text encodes it as this one id.)"""
    if SEG_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens(
            {"extra_special_tokens": [SEG_TOKEN]}, replace_extra_special_tokens=False
        )
    return tokenizer.convert_tokens_to_ids(SEG_TOKEN)


class SamSegmenter(VLMModel):
    """``prompt``: seg_token | fused; ``pool`` (fused): last | mean; ``seg_position``
    (seg_token): at | before; ``num_prompt_tokens``: sparse tokens per mask; ``image_encoder``:
    connector | own; ``mask_size``: the side masks are predicted and scored at (default the
    decoder's); ``loss_weights``: ce, bce, dice (LISA's 1.0, 2.0, 0.5)."""

    def __init__(
        self,
        backbone: Backbone,
        sam: SamHead,
        seg_token_id: int,
        prompt: str = "seg_token",
        pool: str = "last",
        seg_position: str = "at",
        num_prompt_tokens: int = 1,
        image_encoder: str = "connector",
        mask_size: int | None = None,
        loss_weights: dict | None = None,
    ):
        super().__init__()
        for key, value, allowed in (
            ("prompt", prompt, PROMPTS), ("pool", pool, POOLS), ("seg_position", seg_position, SEG_POSITIONS),
            ("sam.image_encoder", image_encoder, ("connector", "own")),
        ):  # fmt: skip
            if value not in allowed:
                raise ValueError(f"{key}={value!r}: choose from {', '.join(allowed)}")
        self.backbone, self.sam = backbone, sam
        self.seg_token_id = seg_token_id
        self.prompt, self.pool, self.seg_position = prompt, pool, seg_position
        self.text_sam = TextSAMConnector(backbone.hidden_size, sam.dim, num_prompt_tokens)
        self.image_sam = (
            ImageEncoderSAMConnector(backbone.grid_channels, sam.dim, sam.embedding_size)
            if image_encoder == "connector"
            else None
        )
        self.mask_size = mask_size or sam.low_res_size
        self.loss_weights = {"ce": 1.0, "bce": 2.0, "dice": 0.5} | dict(loss_weights or {})

    @classmethod
    def from_config(
        cls,
        tokenizer: Any,
        mode: str = "separate",
        vision_tower: dict | None = None,
        llm: dict | None = None,
        connector: dict | None = None,
        select_layer: int = -2,
        vlm: dict | None = None,
        sam: dict | None = None,
        **kwargs: Any,
    ) -> SamSegmenter:
        """Backbone (tower + connector + LLM, or one VLM), then SAM, then the SAM connectors."""
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}: choose from {', '.join(MODES)}")
        seg = add_seg_token(tokenizer)
        image_token = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if mode == "separate" and vlm:
            raise ValueError(
                f"vlm names {vlm.get('name')!r} but mode=separate builds encoder + llm: add mode=vlm"
            )
        if mode == "separate":
            backbone = SeparateBackbone.build(tokenizer, vision_tower, llm, connector, select_layer)
        elif not vlm:
            raise ValueError("mode=vlm needs a VLM: vlm=<preset> (conf/vlm) or vlm.name=<hub id>")
        else:
            backbone = build_vlm_backbone(tokenizer=tokenizer, image_token_id=image_token, **dict(vlm))
        sam = dict(sam or {})
        image_encoder = sam.pop("image_encoder", "connector")
        mask_size = sam.pop("mask_size", None)
        head = SamHead(build_sam(**sam), own_encoder=image_encoder == "own")
        return cls(backbone, head, seg, image_encoder=image_encoder, mask_size=mask_size, **kwargs)

    # -- the contract -----------------------------------------------------------------------------
    def parts(self) -> dict[str, nn.Module]:
        parts = dict(self.backbone.parts())
        parts["text_sam"] = self.text_sam
        if self.image_sam is not None:
            parts["image_sam"] = self.image_sam
        else:
            parts["sam_image_encoder"] = self.sam.image_encoder
        parts["sam_prompt_encoder"] = self.sam.sam.prompt_encoder
        parts["mask_decoder"] = self.sam.sam.mask_decoder
        return parts

    def resolve_tune(self, tune: dict) -> dict:
        """One recipe serves both image-embedding sources: the entry of the one not built
        (``image_sam`` or ``sam_image_encoder``) is dropped."""
        absent = "sam_image_encoder" if self.image_sam is not None else "image_sam"
        return {k: v for k, v in tune.items() if k != absent}

    def blocks(self, part: str) -> nn.ModuleList | None:
        if part == "sam_image_encoder":
            return self.sam.image_encoder.layers
        return self.backbone.blocks(part)

    def unused(self) -> list[nn.Module]:
        """What no loss reaches, kept frozen so DDP never waits for its gradient: the prompt
        encoder's point, box and mask embeddings (only its no-mask embedding is read), the
        decoder's IoU head and its multimask hypernetworks (multimask output is off: only mask
        token 0 becomes a mask), the LM head with ``prompt=fused`` (no text loss; unless tied
        to the input embeddings), and tower blocks past the layer read."""
        pe, md = self.sam.sam.prompt_encoder, self.sam.sam.mask_decoder
        out = [pe.point_embed, pe.not_a_point_embed, pe.mask_embed, md.iou_prediction_head]
        out += [*md.output_hypernetworks_mlps[1:], *self.backbone.unused()]
        head = self.backbone.output_embeddings()
        if self.prompt == "fused" and head.weight is not self.backbone.input_embeddings().weight:
            out.append(head)
        return out

    @property
    def num_image_tokens(self) -> int:
        return self.backbone.num_image_tokens

    def image_transforms(self) -> dict[str, Any]:
        transforms = dict(self.backbone.image_transforms())
        if self.image_sam is None:
            transforms["sam"] = self.sam.image_transform()
        return transforms

    def gradient_checkpointing_enable(self) -> None:
        self.backbone.gradient_checkpointing_enable()

    def picture(self, pixel_values: Any) -> Tensor | None:
        """The batch's images back in [0, 1] (for the overlays), when the pixels are one image
        tensor with a known normalisation."""
        x, spec = pixel_values, getattr(self.backbone, "image_spec", None)
        if isinstance(pixel_values, dict):
            x, spec = pixel_values.get("sam"), self.sam.image_spec if "sam" in pixel_values else None
        if spec is None or not torch.is_tensor(x) or x.dim() != 4:
            return None
        mean, std = (torch.tensor(v, device=x.device)[:, None, None] for v in (spec.mean, spec.std))
        return x.float() * std + mean

    # -- forward ----------------------------------------------------------------------------------
    def prompt_states(
        self, hidden: Tensor, input_ids: Tensor, attention_mask: Tensor
    ) -> tuple[Tensor, Tensor]:
        """-> (states (M, D), the sample each belongs to (M,)), masks in row-major order."""
        if self.prompt == "seg_token":
            at = input_ids == self.seg_token_id
            if self.seg_position == "before":  # the state that predicts [SEG] (LISA's code)
                at = F.pad(at[:, 1:], (0, 1))
            rows, cols = at.nonzero(as_tuple=True)
            return hidden[rows, cols], rows
        valid = attention_mask.bool()
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        if self.pool == "mean":
            w = valid[..., None].to(hidden.dtype)
            return (hidden * w).sum(1) / w.sum(1).clamp(min=1), rows
        last = valid.shape[1] - 1 - valid.flip(1).int().argmax(1)  # right or left padding alike
        return hidden[rows, last], rows

    def image_embeddings(self, pixel_values: Any, grid: Tensor) -> Tensor:
        if self.image_sam is not None:
            return self.image_sam(grid)
        encoder = self.sam.image_encoder
        with torch.no_grad() if is_frozen(encoder) else contextlib.nullcontext():
            return self.sam.encode_image(pixel_values["sam"])

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        pixel_values: Any = None,
        labels: Tensor | None = None,
        loss_weights: Tensor | None = None,
        masks: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """-> ``mask_logits`` (M, mask_size, mask_size), one per ``[SEG]`` (or sample); with
        ``masks`` (M, S, S) uint8 targets, ``loss`` = ce + 2.0 bce + 0.5 dice and its terms."""
        backbone_pixels = pixel_values
        if isinstance(pixel_values, dict) and "sam" in pixel_values:
            rest = {k: v for k, v in pixel_values.items() if k != "sam"}
            backbone_pixels = next(iter(rest.values())) if len(rest) == 1 else rest
        hidden, grid = self.backbone(input_ids, attention_mask, backbone_pixels)
        states, rows = self.prompt_states(hidden, input_ids, attention_mask)
        image = self.image_embeddings(pixel_values, grid)
        logits = self.sam(image[rows], self.text_sam(states))
        if logits.shape[-1] != self.mask_size:
            logits = F.interpolate(
                logits[:, None], size=(self.mask_size,) * 2, mode="bilinear", align_corners=False
            )[:, 0]
        out = {"mask_logits": logits}
        if masks is None:
            return out
        if masks.shape[0] != logits.shape[0]:
            raise ValueError(
                f"{logits.shape[0]} prompts ({self.prompt}) but {masks.shape[0]} target masks in the batch"
            )
        out["bce"], out["dice"] = mask_losses(logits, masks)
        w = self.loss_weights
        loss = w["bce"] * out["bce"] + w["dice"] * out["dice"]
        if self.prompt == "seg_token" and labels is not None:
            out["ce"] = self.text_loss(hidden, labels)
            loss = loss + w["ce"] * out["ce"]
        out["loss"] = loss
        return out

    def text_loss(self, hidden: Tensor, labels: Tensor) -> Tensor:
        """Next-token CE on the answer tokens (``[SEG]`` among them), the LM head on those only."""
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        logits = self.backbone.output_embeddings()(hidden[:, :-1][keep])
        return F.cross_entropy(logits.float(), targets[keep])

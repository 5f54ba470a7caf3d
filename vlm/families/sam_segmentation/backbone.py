"""The vision-language side of a segmenter: what turns an image and a prompt into the LLM's last
hidden states, and the image into a spatial grid for SAM.

Two kinds stand behind one interface, so the SAM side never asks which: ``mode=separate``
(:class:`SeparateBackbone`: a zoo vision tower, an ImageTextConnector, a zoo LLM) and
``mode=vlm`` (:mod:`~vlm.families.sam_segmentation.vlms`: one Hugging Face VLM, its own tower,
projector and language model taken apart). Both splice projected image tokens into the
``<image>`` positions of the token embeddings and run the language model on the result.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.transforms import v2

from vlm.core.builder import build_parts
from vlm.core.recipes import is_frozen
from vlm.core.zoo.llms import decoder_layers
from vlm.core.zoo.registry import ImageSpec


def squash_transform(spec: ImageSpec) -> Callable:
    """Resize to ``size`` x ``size`` without cropping, then normalise. A centre crop would cut
    away the parts of a non-square image's objects that its mask still covers; the target masks
    are squashed the same way (:func:`vlm.data.masks.target_masks`)."""
    return v2.Compose(
        [
            v2.PILToTensor(),
            v2.Resize((spec.size, spec.size), interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(spec.mean, spec.std),
        ]
    )


def positions(attention_mask: Tensor) -> Tensor:
    """Position ids that start at 0 on each sample's first real token: a left-padded sequence
    then reads exactly as its right-padded copy (HF's default, 0..T-1, would shift it)."""
    return (attention_mask.long().cumsum(1) - 1).clamp(min=0)


class Backbone(nn.Module):
    """What the segmenter asks of its vision-language side.

    ``image_token_id``: the id our processor writes into the image span; ``hidden_size``: the
    language model's width; ``grid_channels`` and ``grid_size`` (h, w): the vision tower's patch
    grid that ``encode_image`` returns beside the projected tokens.
    """

    image_token_id: int
    hidden_size: int
    grid_channels: int
    grid_size: tuple[int, int]
    num_image_tokens: int

    def parts(self) -> dict[str, nn.Module]:
        """``vision_tower``, ``connector`` (vision -> text space), ``llm``."""
        raise NotImplementedError

    def blocks(self, part: str) -> nn.ModuleList | None:
        return None

    def unused(self) -> list[nn.Module]:
        """Modules no output depends on (tower blocks past the one read)."""
        return []

    def image_transforms(self) -> dict[str, Callable]:
        raise NotImplementedError

    def encode_image(self, pixel_values: Any) -> tuple[Tensor, Tensor]:
        """-> (tokens (B, num_image_tokens, hidden_size) in the LLM's space, grid (B, C, h, w))."""
        raise NotImplementedError

    def encode_text(self, input_ids: Tensor) -> Tensor:
        """Token embeddings (B, T, hidden_size); image positions hold a placeholder embedding."""
        return self.input_embeddings()(input_ids.masked_fill(input_ids == self.image_token_id, 0))

    def input_embeddings(self) -> nn.Module:
        raise NotImplementedError

    def output_embeddings(self) -> nn.Module:
        """The LM head (text CE in ``prompt=seg_token``)."""
        raise NotImplementedError

    def language_model(self, embeds: Tensor, attention_mask: Tensor, input_ids: Tensor) -> Tensor:
        """The decoder stack on spliced embeddings -> last hidden state (B, T, hidden_size)."""
        raise NotImplementedError

    def forward(self, input_ids: Tensor, attention_mask: Tensor, pixel_values: Any) -> tuple[Tensor, Tensor]:
        """The joint forward -> (last hidden state (B, T, hidden_size), grid (B, C, h, w))."""
        tokens, grid = self.encode_image(pixel_values)
        embeds = self.encode_text(input_ids)
        is_image = input_ids == self.image_token_id
        if int(is_image.sum()) != tokens.shape[0] * tokens.shape[1]:
            raise ValueError(
                f"batch has {int(is_image.sum())} image-token slots but {tokens.shape[0]} images x "
                f"{tokens.shape[1]} tokens: the processor's num_image_tokens is stale"
            )
        embeds = embeds.masked_scatter(
            is_image[..., None], tokens.to(embeds.dtype).reshape(-1, embeds.shape[-1])
        )
        return self.language_model(embeds, attention_mask, input_ids), grid

    def gradient_checkpointing_enable(self) -> None:
        """Non-reentrant, so frozen inputs still pass gradients on to what trains after them."""
        raise NotImplementedError


class SeparateBackbone(Backbone):
    """``mode=separate``: a CLIP-class tower from the zoo, the ImageTextConnector (the
    configured connector, tower width -> LLM width) and a text LLM from the zoo. The grid is the
    patch tokens of the ``select_layer`` state, before the connector."""

    def __init__(
        self, tower: nn.Module, connector: nn.Module, llm: nn.Module, image_token_id: int, select: int
    ):
        super().__init__()
        self.vision_tower, self.connector, self.llm = tower, connector, llm
        self.image_token_id = image_token_id
        self.select_index = select
        self.hidden_size = llm.config.hidden_size
        self.grid_channels = tower.hidden_size
        side = int(round(tower.num_patches**0.5))
        if side * side != tower.num_patches:
            raise ValueError(
                f"vision tower '{tower.name}' has {tower.num_patches} patches: not a square grid"
            )
        self.grid_size = (side, side)
        self.num_image_tokens = connector.num_tokens(tower.num_patches)

    @classmethod
    def build(
        cls, tokenizer: Any, vision_tower: dict, llm: dict, connector: dict, select_layer: int = -2
    ) -> SeparateBackbone:
        """Tower, LLM and connector as every LLaVA-style family builds them (``build_parts``)."""
        p = build_parts(tokenizer, vision_tower, llm, connector, select_layer)
        return cls(p.tower, p.connector(), p.llm, p.image_token_id, p.select_index)

    @property
    def image_spec(self) -> ImageSpec:
        return self.vision_tower.image_spec

    def parts(self) -> dict[str, nn.Module]:
        return {"vision_tower": self.vision_tower, "connector": self.connector, "llm": self.llm}

    def blocks(self, part: str) -> nn.ModuleList | None:
        if part == "vision_tower":
            return self.vision_tower.blocks
        return decoder_layers(self.llm) if part == "llm" else None

    def unused(self) -> list[nn.Module]:
        return list(self.vision_tower.blocks[self.select_index :])

    def image_transforms(self) -> dict[str, Callable]:
        return {"vision": squash_transform(self.vision_tower.image_spec)}

    def encode_image(self, pixel_values: Tensor) -> tuple[Tensor, Tensor]:
        tower = self.vision_tower
        with torch.no_grad() if is_frozen(tower) else contextlib.nullcontext():
            h = tower.states(pixel_values, self.select_index)[-1][:, tower.num_prefix_tokens :]
        grid = h.transpose(1, 2).reshape(h.shape[0], h.shape[2], *self.grid_size)
        return self.connector(h), grid

    def input_embeddings(self) -> nn.Module:
        return self.llm.get_input_embeddings()

    def output_embeddings(self) -> nn.Module:
        return self.llm.get_output_embeddings()

    def language_model(self, embeds: Tensor, attention_mask: Tensor, input_ids: Tensor) -> Tensor:
        lm = self.llm.base_model
        return lm(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=positions(attention_mask),
            use_cache=False,
        ).last_hidden_state

    def gradient_checkpointing_enable(self) -> None:
        self.llm.activation_checkpointing_enable({"use_reentrant": False})

"""The LLaVA-style core: vision tower -> connector -> LLM, with image features scattered into
``<image>`` positions. ``family=llava`` is this model as it is; ``calm``, ``layer_fusion`` and
the Q-Former captioner subclass it to swap or add a part.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from vlm.core.builder import LlavaParts, build_parts, select_indices
from vlm.core.fused_ce import head_cross_entropy
from vlm.core.greedy import greedy, is_plain_greedy
from vlm.core.model import VLMModel
from vlm.core.positions import ImageLayout, Piece, build_image_positions
from vlm.core.processor import image_transform
from vlm.core.recipes import is_frozen
from vlm.core.tokenizer import IGNORE_INDEX
from vlm.core.zoo.llms import decoder_layers


class LlavaModel(VLMModel):
    """LLaVA-1.5 (Liu et al. 2023, Sec. 3): features of ``select_layer`` of the vision tower
    (``-2``: the penultimate block, as in LLaVA) pass the connector and replace the image
    tokens' embeddings. A list of layers is read as HF LLaVA reads a list
    ``vision_feature_layer``: the states concatenated along channels, in the order given.

    A family changes one part by passing another tower (CALM's composite) or overriding
    :meth:`encode_images` (multi-layer fusion); nothing else needs to know. ``select_layer``
    counts hidden states as HF does: 0 the embeddings, 1..N after each block, -1 the last.
    """

    def __init__(
        self,
        vision_tower: nn.Module,
        connector: nn.Module,
        llm: nn.Module,
        image_token_id: int,
        select_layer: int | Sequence[int] = -2,
        select_feature: str = "patch",
        image_positions: dict | None = None,
    ):
        super().__init__()
        if select_feature not in ("patch", "cls_patch"):
            raise ValueError(f"select_feature must be 'patch' or 'cls_patch', got '{select_feature}'")
        self.vision_tower = vision_tower
        self.connector = connector
        self.llm = llm
        self.image_token_id = image_token_id
        self.select_indices = select_indices(select_layer, vision_tower)  # 0 = embeddings, i = after block i
        self.select_feature = select_feature
        self.image_positions = build_image_positions(
            image_positions, self.image_layout(), llm, image_token_id
        )

    @property
    def select_index(self) -> int:
        """The one state read (families built on a single base layer)."""
        if len(self.select_indices) > 1:
            raise ValueError(f"{type(self).__name__} reads one base layer, not {list(self.select_indices)}")
        return self.select_indices[0]

    @classmethod
    def from_config(
        cls,
        tokenizer: Any,
        vision_tower: dict,
        llm: dict,
        connector: dict,
        select_layer: int | list[int] = -2,
        select_feature: str = "patch",
        image_positions: dict | None = None,
    ) -> LlavaModel:
        """Tower and LLM from the zoo; the connector completed with their widths."""
        p = build_parts(tokenizer, vision_tower, llm, connector, select_layer, select_feature)
        return cls(
            p.tower,
            cls.make_connector(p),
            p.llm,
            p.image_token_id,
            p.select_indices,
            p.select_feature,
            image_positions,
        )

    @classmethod
    def make_connector(cls, parts: LlavaParts) -> nn.Module:
        """The configured connector from the tower's width to the LLM's; a family whose
        connectors need more of the tower (its depth) completes them here."""
        return parts.connector()

    # -- the contract -----------------------------------------------------------------------------
    def parts(self) -> dict[str, nn.Module]:
        return {
            "vision_tower": self.vision_tower,
            "connector": self.connector,
            "llm": self.llm,
        } | self.position_part()

    def position_part(self) -> dict[str, nn.Module]:
        """``image_positions`` is a part where it learns something (``learned2d``, ``sincos2d``'s
        scale); unless the recipe names it, it trains as the connector does."""
        learns = any(True for _ in self.image_positions.parameters())
        return {"image_positions": self.image_positions} if learns else {}

    def resolve_tune(self, tune: dict) -> dict:
        if self.position_part():
            tune.setdefault("image_positions", tune.get("connector"))
        return tune

    def blocks(self, part: str) -> nn.ModuleList | None:
        if part == "vision_tower":
            return self.vision_tower.blocks
        if part == "llm":
            return decoder_layers(self.llm)
        return None

    def unused(self) -> list[nn.Module]:
        """Tower blocks past the one read: :meth:`tower_states` never runs them."""
        return list(self.vision_tower.blocks[self.deepest_state :])

    @property
    def deepest_state(self) -> int:
        """The deepest tower hidden state the model reads."""
        return max(self.select_indices)

    def hf_llava_layout(self) -> tuple[list[int], nn.Module]:
        """What HF's ``LlavaForConditionalGeneration`` reads: the hidden states concatenated
        along channels (``vision_feature_layer``) and the module that is its projector. A
        family whose features HF's class cannot compute raises ``NotExportable`` naming what
        would export (:mod:`vlm.core.hf_llava` checks the rest: tower, projector, strategy)."""
        return list(self.select_indices), self.connector

    def image_transforms(self) -> dict:
        return {"vision": image_transform(self.vision_tower.image_spec)}

    def gradient_checkpointing_enable(self) -> None:
        """Non-reentrant, so frozen inputs still pass gradients on; a composite tower that runs
        trained modules inside (CALM) checkpoints those too."""
        self.llm.activation_checkpointing_enable({"use_reentrant": False})
        tower_checkpointing = getattr(self.vision_tower, "gradient_checkpointing_enable", None)
        if tower_checkpointing:
            tower_checkpointing()

    @property
    def num_image_tokens(self) -> int:
        tower = self.vision_tower
        n = tower.num_patches + (tower.num_prefix_tokens if self.select_feature == "cls_patch" else 0)
        return self.connector.num_tokens(n)

    def image_layout(self) -> ImageLayout | None:
        """Where the connector's output tokens sit: the prefix tokens (``cls_patch``), then the
        square patch grid as the connector leaves it (``token_layout``: pooled, or grids and
        pooled runs). None where they have no 2-D place."""
        tower = self.vision_tower
        side = math.isqrt(tower.num_patches)
        if side * side != tower.num_patches:
            return None
        prefix = tower.num_prefix_tokens if self.select_feature == "cls_patch" else 0
        token_layout = getattr(self.connector, "token_layout", None)
        pieces = token_layout(side) if token_layout else (Piece(side, side),)
        return ImageLayout(((Piece(prefix),) if prefix else ()) + tuple(pieces))

    def tower_states(self, pixel_values: Tensor | dict[str, Tensor], upto: int) -> list[Tensor]:
        """Hidden states 0..``upto`` of the tower via its explicit block loop: blocks past
        ``upto`` are never run, and a frozen tower runs without autograd."""
        tower = self.vision_tower
        with torch.no_grad() if is_frozen(tower) else contextlib.nullcontext():
            return tower.states(pixel_values, upto)

    def select(self, h: Tensor) -> Tensor:
        if self.select_feature == "patch":
            return h[:, self.vision_tower.num_prefix_tokens :]
        return h

    def encode_images(self, pixel_values: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, num_image_tokens, D_llm)."""
        states = self.tower_states(pixel_values, self.deepest_state)
        h = torch.cat([states[i] for i in self.select_indices], dim=-1)  # (B, T, k * D_v)
        return self.connector(self.select(h))

    def embed_inputs(self, input_ids: Tensor, pixel_values: Tensor | None) -> Tensor:
        """The LLM's ``inputs_embeds``: token embeddings with image features written into the
        ``<image>`` positions. (A tower's ``embed`` is its patch embedding: pixels -> h0.)"""
        is_image = input_ids == self.image_token_id
        embeds = self.llm.get_input_embeddings()(input_ids.masked_fill(is_image, 0))
        n_slots = int(is_image.sum())
        if pixel_values is None:
            if n_slots:
                raise ValueError(f"{n_slots} image tokens in the batch but no pixel_values")
            return embeds
        feats = self.image_positions.add(self.encode_images(pixel_values)).to(embeds.dtype)  # (B_img, P, D)
        if feats.shape[0] * feats.shape[1] != n_slots:
            raise ValueError(
                f"batch has {n_slots} image-token slots but {feats.shape[0]} images x "
                f"{feats.shape[1]} features: the processor's num_image_tokens is stale"
            )
        return embeds.masked_scatter(is_image[..., None], feats.reshape(-1, feats.shape[-1]))

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        pixel_values: Tensor | None = None,
        labels: Tensor | None = None,
        loss_weights: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """With ``labels``, the LM head runs only on the positions that predict a target token:
        on VQA that is a few tokens per sample instead of the full (B, T, vocab) logits.
        ``loss_weights`` (B, T), aligned with ``labels``: a weighted mean over the targets."""
        embeds = self.embed_inputs(input_ids, pixel_values)
        hidden = self.llm.base_model(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=self.image_positions.position_ids(input_ids, attention_mask),
            use_cache=False,
        ).last_hidden_state  # (B, T, D)
        head = self.llm.get_output_embeddings()
        if labels is None:
            return {"logits": head(hidden)}
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        weights = None if loss_weights is None else loss_weights[:, 1:][keep].float()
        # fused with the head and chunked at a large vocabulary: no (n_targets, vocab) logits kept
        loss = head_cross_entropy(head, hidden[:, :-1][keep], targets[keep], weights)
        return {"loss": loss, "n_targets": keep.sum()}

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        pixel_values: Tensor | None = None,
        **generate_kwargs,
    ) -> Tensor:
        """Left-padded prompts -> new token ids (B, <= max_new_tokens), KV cache on. Greedy,
        sampling (``do_sample``, ``temperature``, ``top_p``) and beam search (``num_beams``)
        are transformers' own ``generate``. Decoding runs eager even where ``family.compile``
        compiled the decoder layers: the KV cache's per-layer state would recompile every layer.
        The prompt's positions are the forward pass's; ``generate`` continues each row by one.
        A plain greedy call takes :func:`vlm.core.greedy.greedy`, the same tokens without
        ``generate``'s per-token machinery."""
        embeds = self.embed_inputs(input_ids, pixel_values)
        positions = self.image_positions.position_ids(input_ids, attention_mask)
        with torch.compiler.set_stance("force_eager"):
            if is_plain_greedy(self.llm, generate_kwargs):
                return greedy(self.llm, embeds, attention_mask, positions, **generate_kwargs)
            return self.llm.generate(
                inputs_embeds=embeds,
                attention_mask=attention_mask,
                position_ids=positions,
                use_cache=True,
                **generate_kwargs,
            )

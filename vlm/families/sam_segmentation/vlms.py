"""``mode=vlm``: one Hugging Face VLM taken apart into vision tower, projector and language model.

The VLM's own modules run as the VLM runs them (same feature layer, same projector, same text
path), so what the segmenter reads is what the pretrained VLM computes; only the splice moves
into :meth:`Backbone.forward`, keyed by our processor's ``<image>`` id. Supported, by
``config.model_type``: ``llava`` (LLaVA-1.5), ``idefics3`` / ``smolvlm`` (Idefics3, SmolVLM),
``qwen2_vl`` (Qwen2-VL), ``paligemma`` (PaliGemma).

Every type takes one fixed-size square image, resized without cropping (``squash_transform``)
so the target masks stay aligned: no LLaVA pad-to-square, no Idefics3 image splitting, no
Qwen2-VL dynamic resolution (its min = max pixels).
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Callable, Mapping
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import Tensor, nn
from transformers import (
    AutoConfig,
    BitsAndBytesConfig,
    CLIPImageProcessor,
    Idefics3ForConditionalGeneration,
    Idefics3ImageProcessor,
    LlavaForConditionalGeneration,
    PaliGemmaForConditionalGeneration,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessor,
    SiglipImageProcessor,
    SmolVLMForConditionalGeneration,
    SmolVLMImageProcessor,
)
from transformers.vision_utils import get_vision_attention_seqlens, get_vision_position_ids

from vlm.core.recipes import is_frozen
from vlm.core.zoo.hub import load_pretrained
from vlm.core.zoo.registry import PRESETS, ImageSpec, reject_unknown
from vlm.families.sam_segmentation.backbone import Backbone, squash_transform

LOAD_IN = ("4bit", "8bit")
CONFIG_KEY = "vlm.pretrained"  # the setting a CheckpointMissingError tells the user to switch off

# Tiny presets: the real classes at width 64, 2 blocks, 4 heads; 32 px images in patches of 8
# (a 4x4 grid). The vocabulary, special ids and image token come from the caller's tokenizer.
_TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256)  # fmt: skip
_TINY_VIT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 image_size=32, patch_size=8)  # fmt: skip
_TINY_MROPE = {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}  # head_dim 16
TINY: dict[str, tuple[str, dict[str, Any]]] = {
    "tiny_llava": ("llava", dict(vision_config=dict(model_type="clip_vision_model", **_TINY_VIT))),
    "tiny_idefics3": ("idefics3", dict(vision_config=_TINY_VIT, scale_factor=2)),
    "tiny_smolvlm": ("smolvlm", dict(vision_config=_TINY_VIT, scale_factor=2)),
    "tiny_qwen2_vl": ("qwen2_vl", dict(
        vision_config=dict(depth=2, embed_dim=64, hidden_size=64, num_heads=4, patch_size=8),
        text_config=dict(rope_parameters=_TINY_MROPE),
    )),
    "tiny_paligemma": ("paligemma", dict(
        vision_config=dict(model_type="siglip_vision_model", vision_use_head=False, **_TINY_VIT),
        text_config=dict(head_dim=16), projection_dim=64, hidden_size=64,
    )),
}  # fmt: skip

# preset="real" when the hub id's config.json is not cached (a cached one always wins): the
# shapes of the checkpoints conf/vlm names. LlavaConfig() is llava-1.5-7b (CLIP ViT-L/14-336 +
# Llama-2-7B; the hub pads the vocabulary to 32064) and PaliGemmaConfig() paligemma-3b-pt-224
# (SigLIP So400m/14-224 + Gemma-2B); Qwen2VLConfig() is the 72B and Idefics3Config() Idefics3-8B,
# so those two ids carry their own shapes.
REAL: dict[str, tuple[str, dict[str, Any]]] = {
    "llava-hf/llava-1.5-7b-hf": ("llava", dict(text_config=dict(vocab_size=32064))),
    "google/paligemma-3b-pt-224": ("paligemma", {}),
    "Qwen/Qwen2-VL-2B-Instruct": ("qwen2_vl", dict(
        text_config=dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                         rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24],
                                          "rope_theta": 1e6}),
        vision_config=dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16, patch_size=14),
        tie_word_embeddings=True,
    )),
    "HuggingFaceTB/SmolVLM-256M-Instruct": ("idefics3", dict(
        text_config=dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49280),
        vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                           num_attention_heads=12, image_size=512, patch_size=16),
        scale_factor=4,
    )),
}  # fmt: skip


class VLMBackbone(Backbone):
    """A VLM behind the :class:`Backbone` interface. Subclasses say where the VLM keeps its
    tower, projector (``connector``) and language model, and how the tower's patch features are
    read; the embeddings, LM head and text path are the VLM's own.

    The language model runs through the VLM's base model on ``inputs_embeds``, with its own
    masks and positions. Left padding (``collate_prompts``) shifts a row's positions uniformly,
    which RoPE (relative by construction) does not see; Qwen2-VL's M-RoPE skips the padding.
    """

    model_type: str
    hf_class: type[PreTrainedModel]
    image_processor: type  # whose defaults give the normalisation

    def __init__(self, vlm: PreTrainedModel, image_token_id: int, image_size: int | None = None):
        super().__init__()
        self.vlm = vlm
        self.image_token_id = image_token_id
        self.hidden_size = vlm.config.get_text_config().hidden_size
        size = self._image_size(image_size)
        proc = self.image_processor
        self.image_spec = ImageSpec(size, tuple(proc.image_mean), tuple(proc.image_std))

    def _image_size(self, image_size: int | None) -> int:
        """The tower's fixed input side; only Qwen2-VL takes another."""
        size = self.vlm.config.vision_config.image_size
        if image_size not in (None, size):
            raise ValueError(
                f"image_size={image_size}: {self.model_type}'s tower takes {size} px (only qwen2_vl resizes)"
            )
        return size

    # -- where the parts are ------------------------------------------------------------------------
    @property
    def tower(self) -> nn.Module:
        raise NotImplementedError

    @property
    def connector(self) -> nn.Module:
        raise NotImplementedError

    @property
    def text_model(self) -> nn.Module:
        """The VLM's decoder (embeddings, blocks, final norm)."""
        raise NotImplementedError

    @property
    def llm(self) -> nn.Module:
        """The decoder with the LM head, so every parameter has a part (a tied head is the
        embedding matrix again). A view built on each call, never a child: the weights stay
        registered once, under ``vlm``, and the view never goes stale."""
        view = nn.ModuleDict({"language_model": self.text_model, "lm_head": self.vlm.get_output_embeddings()})
        view.training = self.text_model.training  # reads as the modules it holds
        return view

    @property
    def tower_blocks(self) -> nn.ModuleList:
        raise NotImplementedError

    def parts(self) -> dict[str, nn.Module]:
        return {"vision_tower": self.tower, "connector": self.connector, "llm": self.llm}

    def blocks(self, part: str) -> nn.ModuleList | None:
        return {"vision_tower": self.tower_blocks, "llm": self.text_model.layers}.get(part)

    def unused(self) -> list[nn.Module]:
        """Tower modules no output depends on (kept frozen so DDP waits for no gradient)."""
        return []

    # -- image side -----------------------------------------------------------------------------------
    def image_transforms(self) -> dict[str, Callable]:
        return {"vision": squash_transform(self.image_spec)}

    def encode_image(self, pixel_values: Tensor) -> tuple[Tensor, Tensor]:
        """``pixel_values`` (B, 3, S, S) from ``image_transforms``."""
        with torch.no_grad() if is_frozen(self.tower) else contextlib.nullcontext():
            features = self.tower_features(pixel_values.to(self.vlm.dtype))
        return self.project(features), self.to_grid(features)

    def tower_features(self, pixel_values: Tensor) -> Tensor:
        """-> the patch features the projector reads (B, N, C), in the tower's token order."""
        raise NotImplementedError

    def project(self, features: Tensor) -> Tensor:
        return self.connector(features)

    def to_grid(self, features: Tensor) -> Tensor:
        """(B, N, C) row-major patches (a leading CLS dropped) -> (B, C, h, w)."""
        h, w = self.grid_size
        features = features[:, -h * w :]
        return features.transpose(1, 2).reshape(features.shape[0], -1, h, w)

    # -- text side ------------------------------------------------------------------------------------
    def input_embeddings(self) -> nn.Module:
        return self.vlm.get_input_embeddings()

    def output_embeddings(self) -> nn.Module:
        return self.vlm.get_output_embeddings()

    def language_model(self, embeds: Tensor, attention_mask: Tensor, input_ids: Tensor) -> Tensor:
        extra = self.text_inputs(attention_mask, input_ids)
        out = self.vlm.model(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False, **extra)
        return out.last_hidden_state

    def text_inputs(self, attention_mask: Tensor, input_ids: Tensor) -> dict[str, Tensor]:
        """Keyword inputs of the VLM's base model besides the embeddings and mask."""
        return {}

    def gradient_checkpointing_enable(self) -> None:
        self.vlm.activation_checkpointing_enable({"use_reentrant": False})


class _TowerProjectorLM(VLMBackbone):
    """LLaVA's and PaliGemma's layout: ``model.vision_tower``, ``model.multi_modal_projector``,
    ``model.language_model``."""

    @property
    def tower(self) -> nn.Module:
        return self.vlm.model.vision_tower

    @property
    def connector(self) -> nn.Module:
        return self.vlm.model.multi_modal_projector

    @property
    def text_model(self) -> nn.Module:
        return self.vlm.model.language_model

    @property
    def tower_blocks(self) -> nn.ModuleList:
        return self.tower.encoder.layers


class LlavaBackbone(_TowerProjectorLM):
    """LLaVA-1.5: CLIP tower (``vision_feature_layer``, CLS dropped under the ``default``
    strategy), the 2-layer MLP projector, Llama. Tokens = patches (+1 CLS under ``full``)."""

    model_type = "llava"
    hf_class = LlavaForConditionalGeneration
    image_processor = CLIPImageProcessor

    def __init__(self, vlm: PreTrainedModel, image_token_id: int, image_size: int | None = None):
        super().__init__(vlm, image_token_id, image_size)
        cfg = vlm.config
        layer = cfg.vision_feature_layer
        self.feature_layers = [layer] if isinstance(layer, int) else list(layer)
        self.keep_cls = cfg.vision_feature_select_strategy == "full"
        side = cfg.vision_config.image_size // cfg.vision_config.patch_size
        self.grid_size = (side, side)
        self.grid_channels = cfg.vision_config.hidden_size * len(self.feature_layers)
        self.num_image_tokens = side * side + int(self.keep_cls)

    def unused(self) -> list[nn.Module]:
        """The blocks past the deepest feature layer read, and the post-LayerNorm."""
        n = len(self.tower_blocks)
        deepest = max(i % (n + 1) for i in self.feature_layers)  # hidden_states[i]: after i blocks
        return [*self.tower_blocks[deepest:], self.tower.post_layernorm]

    def tower_features(self, pixel_values: Tensor) -> Tensor:
        states = self.tower(pixel_values, output_hidden_states=True).hidden_states
        features = torch.cat([states[i] for i in self.feature_layers], dim=-1)
        return features if self.keep_cls else features[:, 1:]


class Idefics3Backbone(VLMBackbone):
    """Idefics3: SigLIP-class tower (last state, post-LayerNorm), the connector (pixel shuffle by
    ``scale_factor`` + linear), Llama. Tokens = patches / scale_factor^2; one global image, no
    splitting (so no ``<row_x_col_y>`` tiles)."""

    model_type = "idefics3"
    hf_class = Idefics3ForConditionalGeneration
    image_processor = Idefics3ImageProcessor

    def __init__(self, vlm: PreTrainedModel, image_token_id: int, image_size: int | None = None):
        super().__init__(vlm, image_token_id, image_size)
        vision = vlm.config.vision_config
        side = vision.image_size // vision.patch_size
        self.grid_size = (side, side)
        self.grid_channels = vision.hidden_size
        self.num_image_tokens = side * side // vlm.config.scale_factor**2

    @property
    def tower(self) -> nn.Module:
        return self.vlm.model.vision_model

    @property
    def connector(self) -> nn.Module:
        return self.vlm.model.connector

    @property
    def text_model(self) -> nn.Module:
        return self.vlm.model.text_model

    @property
    def tower_blocks(self) -> nn.ModuleList:
        return self.tower.encoder.layers

    def tower_features(self, pixel_values: Tensor) -> Tensor:
        return self.tower(pixel_values).last_hidden_state


class SmolVLMBackbone(Idefics3Backbone):
    """SmolVLM2 (``smolvlm``): Idefics3's layout. SmolVLM-256M/500M/2.2B ship as ``idefics3``."""

    model_type = "smolvlm"
    hf_class = SmolVLMForConditionalGeneration
    image_processor = SmolVLMImageProcessor


class _Qwen2VLTower(nn.Module):
    """Qwen2-VL's vision transformer without its merger, which is the connector: freezing the
    tower must leave the merger trainable. A view on the VLM's modules, as ``VLMBackbone.llm``."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.patch_embed = visual.patch_embed
        self.rotary_pos_emb = visual.rotary_pos_emb
        self.blocks = visual.blocks
        self.config = visual.config
        self.training = visual.blocks.training  # reads as the modules it holds

    def forward(self, patches: Tensor, grid_thw: Tensor) -> Tensor:
        """``Qwen2VisionTransformerPretrainedModel.forward`` up to the merger -> (N, embed_dim)."""
        position_ids = get_vision_position_ids(grid_thw, self.config.spatial_merge_size)
        cu_seqlens, max_seqlen = get_vision_attention_seqlens(grid_thw, self.config)
        hidden = self.patch_embed(patches)
        rope = self.rotary_pos_emb(hidden, position_ids)
        for block in self.blocks:
            hidden = block(hidden, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, position_embeddings=rope)
        return hidden


class Qwen2VLBackbone(VLMBackbone):
    """Qwen2-VL: the ViT (2-D RoPE, temporal patch 2) without its merger, the merger (LayerNorm,
    m x m patches concatenated, MLP) as connector, the M-RoPE Qwen2 decoder. One fixed ``S`` px
    square (S a multiple of patch x merge): grid_thw = (1, S/p, S/p) for every image, tokens =
    (S/p)^2 / m^2. Pixels arrive as a plain (B, 3, S, S) image and are flattened into Qwen2-VL's
    patch layout here, on the device."""

    model_type = "qwen2_vl"
    hf_class = Qwen2VLForConditionalGeneration
    image_processor = Qwen2VLImageProcessor
    default_image_size = 448  # 32 x 32 patches of 14 -> 256 tokens

    def __init__(self, vlm: PreTrainedModel, image_token_id: int, image_size: int | None = None):
        super().__init__(vlm, image_token_id, image_size)
        vision = vlm.config.vision_config
        side = self.image_spec.size // vision.patch_size
        self.grid_size = (side, side)
        self.grid_channels = vision.embed_dim
        self.num_image_tokens = side * side // vision.spatial_merge_size**2

    def _image_size(self, image_size: int | None) -> int:
        vision = self.vlm.config.vision_config
        size = image_size or self.default_image_size
        step = vision.patch_size * vision.spatial_merge_size
        if size % step:
            raise ValueError(f"image_size={size}: qwen2_vl needs a multiple of patch x merge = {step}")
        return size

    @property
    def tower(self) -> nn.Module:
        return _Qwen2VLTower(self.vlm.model.visual)

    @property
    def connector(self) -> nn.Module:
        return self.vlm.model.visual.merger

    @property
    def text_model(self) -> nn.Module:
        return self.vlm.model.language_model

    @property
    def tower_blocks(self) -> nn.ModuleList:
        return self.vlm.model.visual.blocks

    def grid_thw(self, n: int, device: torch.device) -> Tensor:
        """(n, 3): every image is one frame of the fixed patch grid."""
        return torch.tensor([[1, *self.grid_size]], device=device).expand(n, 3)

    def patchify(self, images: Tensor) -> Tensor:
        """(B, 3, S, S) -> (B * N, 3 * t * p * p) as ``Qwen2VLImageProcessor`` lays patches out:
        grouped by m x m merge window, each patch repeated over the temporal patch (a still)."""
        vision = self.vlm.config.vision_config
        p, m, t = vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size
        b, c, h, w = images.shape
        x = images.reshape(b, c, h // p // m, m, p, w // p // m, m, p).permute(0, 2, 5, 3, 6, 1, 4, 7)
        x = x.unsqueeze(6).expand(-1, -1, -1, -1, -1, -1, t, -1, -1)
        return x.reshape(b * (h // p) * (w // p), c * t * p * p)

    def tower_features(self, pixel_values: Tensor) -> Tensor:
        b = pixel_values.shape[0]
        hidden = self.tower(self.patchify(pixel_values), self.grid_thw(b, pixel_values.device))
        return hidden.view(b, -1, hidden.shape[-1])

    def project(self, features: Tensor) -> Tensor:
        return self.connector(features.flatten(0, 1)).view(features.shape[0], self.num_image_tokens, -1)

    def to_grid(self, features: Tensor) -> Tensor:
        """Merge-window order (B, h/m, w/m, m, m, C) -> row-major (B, C, h, w)."""
        (h, w), m = self.grid_size, self.vlm.config.vision_config.spatial_merge_size
        x = features.reshape(features.shape[0], h // m, w // m, m, m, -1)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(features.shape[0], -1, h, w)

    def text_inputs(self, attention_mask: Tensor, input_ids: Tensor) -> dict[str, Tensor]:
        """M-RoPE positions (3, B, T) from Qwen2-VL's own ``get_rope_index``: text before the
        image counts on, the image span takes (t, h, w) indices of the merged grid, text after
        resumes at their max + 1; padding is skipped (so left padding shifts nothing)."""
        is_image = input_ids == self.image_token_id
        positions, _ = self.vlm.model.get_rope_index(
            input_ids,
            mm_token_type_ids=is_image.int(),
            image_grid_thw=self.grid_thw(input_ids.shape[0], input_ids.device),
            attention_mask=attention_mask,
        )
        return {"position_ids": positions}


class PaliGemmaBackbone(_TowerProjectorLM):
    """PaliGemma: SigLIP tower (last state), the linear projector, Gemma. Tokens = patches.

    Gemma is PaliGemma's prefix-LM: its prefix attends both ways. The interface does not say
    where the prompt ends, so the prefix here is the image span and anything before it (all of
    it in PaliGemma's own ``<image>...<bos>prompt`` layout); the text after is causal, so the
    text CE never sees the future.
    """

    model_type = "paligemma"
    hf_class = PaliGemmaForConditionalGeneration
    image_processor = SiglipImageProcessor

    def __init__(self, vlm: PreTrainedModel, image_token_id: int, image_size: int | None = None):
        super().__init__(vlm, image_token_id, image_size)
        vision = vlm.config.vision_config
        side = vision.image_size // vision.patch_size
        self.grid_size = (side, side)
        self.grid_channels = vision.hidden_size
        self.num_image_tokens = side * side

    def tower_features(self, pixel_values: Tensor) -> Tensor:
        return self.tower(pixel_values).last_hidden_state

    def text_inputs(self, attention_mask: Tensor, input_ids: Tensor) -> dict[str, Tensor]:
        idx = torch.arange(input_ids.shape[1], device=input_ids.device)
        last_image = torch.where(input_ids == self.image_token_id, idx, -1).amax(-1, keepdim=True)
        return {"token_type_ids": (idx > last_image).long()}


BACKBONES: dict[str, type[VLMBackbone]] = {
    cls.model_type: cls
    for cls in (LlavaBackbone, Idefics3Backbone, SmolVLMBackbone, Qwen2VLBackbone, PaliGemmaBackbone)
}


def backbone_class(config: PretrainedConfig) -> type[VLMBackbone]:
    """The adapter for ``config.model_type``; never guessed from a name."""
    cls = BACKBONES.get(config.model_type)
    if cls is None:
        raise ValueError(
            f"VLM model_type {config.model_type!r} is not supported: choose from {', '.join(BACKBONES)}"
        )
    return cls


def build_vlm_backbone(
    name: str,
    tokenizer: Any,
    image_token_id: int,
    pretrained: bool = False,
    preset: str = "tiny",
    load_in: str | None = None,
    image_size: int | None = None,
    **overrides: Any,
) -> VLMBackbone:
    """The VLM ``name`` taken apart behind the :class:`Backbone` interface.

    ``name``: a tiny preset (``TINY``; random init, vocabulary = ``len(tokenizer)``, the
    tokenizer's bos/eos/pad ids, ``image_token_id`` as the VLM's own image id) or a hub id.
    A hub id with ``pretrained=True`` loads its weights from the local HF cache (a missing one is
    a ``CheckpointMissingError``); with ``pretrained=False`` and ``preset="real"`` it is built at
    real size with random init (benchmarks) from its cached config, else from ``REAL``.
    ``load_in``: "4bit" (nf4, bf16 compute) or "8bit" via bitsandbytes, pretrained on CUDA only.
    ``image_size``: Qwen2-VL's fixed side (default 448; tiny 32); the other towers fix their own.
    ``overrides``: ``attn_implementation`` (default "sdpa"), ``dtype`` (default float32, bf16
    with ``load_in``), and config keys (a dict for ``text_config`` / ``vision_config`` updates it).
    The token embeddings grow to ``len(tokenizer)`` when the tokenizer gained tokens.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {PRESETS}")
    if load_in is not None:
        _check_load_in(load_in, pretrained)
    overrides = {
        k: OmegaConf.to_container(v) if isinstance(v, (DictConfig, ListConfig)) else v
        for k, v in overrides.items()
    }
    attn = overrides.pop("attn_implementation", "sdpa")
    dtype = overrides.pop("dtype", torch.bfloat16 if load_in else torch.float32)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    kwargs = dict(attn_implementation=attn, dtype=dtype)
    if name in TINY:
        config = _tiny_config(name, tokenizer, image_token_id)
        if config.model_type == "qwen2_vl":  # the other tiny towers' 32 px: 4 x 4 patches
            image_size = image_size or _TINY_VIT["image_size"]
    elif pretrained:
        if load_in is not None:
            kwargs["quantization_config"] = _quantization(load_in)

        def load(source: str) -> tuple[type[VLMBackbone], PreTrainedModel]:
            config = AutoConfig.from_pretrained(source)
            cls = backbone_class(config)
            _override(config, overrides, name)
            return cls, cls.hf_class.from_pretrained(source, config=config, **kwargs)

        cls, vlm = load_pretrained(load, name, CONFIG_KEY)
        return _finish(cls, vlm, tokenizer, image_token_id, image_size)
    elif preset == "real":
        config = _real_config(name)
    else:
        raise ValueError(
            f"vlm {name!r}: a hub id needs pretrained=true or preset=real; tiny presets: {', '.join(TINY)}"
        )
    cls = backbone_class(config)
    _override(config, overrides, name)
    return _finish(cls, cls.hf_class._from_config(config, **kwargs), tokenizer, image_token_id, image_size)


def _check_load_in(load_in: str, pretrained: bool) -> None:
    if load_in not in LOAD_IN:
        raise ValueError(f"vlm.load_in={load_in!r}: choose from {', '.join(LOAD_IN)} or null")
    if not pretrained:
        raise ValueError(
            f"vlm.load_in={load_in} needs vlm.pretrained=true: quantising random weights measures nothing"
        )
    if not torch.cuda.is_available():
        raise ValueError(
            f"vlm.load_in={load_in}: 4/8-bit loading needs bitsandbytes on a CUDA device "
            "and this machine has none"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError(
            f"vlm.load_in={load_in}: 4/8-bit loading needs bitsandbytes: pip install bitsandbytes"
        )


def _quantization(load_in: str) -> BitsAndBytesConfig:
    if load_in == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
    )


def _tiny_config(name: str, tokenizer: Any, image_token_id: int) -> PretrainedConfig:
    model_type, arch = TINY[name]
    ids = {k: getattr(tokenizer, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    ids = {k: v for k, v in ids.items() if v is not None}  # validation's stand-in has none
    text = _TINY_TEXT | arch.get("text_config", {}) | ids | {"vocab_size": len(tokenizer)}
    config = AutoConfig.for_model(model_type, **(arch | {"text_config": text}))
    config.image_token_id = image_token_id
    return config


def _real_config(name: str) -> PretrainedConfig:
    """The hub's config if cached, else the embedded shape of a known id."""
    try:
        return AutoConfig.from_pretrained(name, local_files_only=True)
    except OSError:
        if name not in REAL:
            raise ValueError(
                f"vlm {name!r}: no config.json in the local HF cache and no embedded shape: "
                f"run `hf download {name} config.json`, or use one of {', '.join(REAL)}"
            ) from None
    model_type, arch = REAL[name]
    return AutoConfig.for_model(model_type, **arch)


def _override(config: PretrainedConfig, overrides: Mapping[str, Any], name: str) -> None:
    """Config keys on top of the config; a typo fails here (HF configs keep any keyword)."""
    reject_unknown(config, overrides, name)
    for key, value in overrides.items():
        sub = getattr(config, key)
        if isinstance(sub, PretrainedConfig) and isinstance(value, Mapping):
            reject_unknown(sub, value, f"{name}.{key}")
            for k, v in value.items():
                setattr(sub, k, v)
        else:
            setattr(config, key, value)


def _finish(
    cls: type[VLMBackbone], vlm: PreTrainedModel, tokenizer: Any, image_token_id: int, image_size: int | None
) -> VLMBackbone:
    """Grow the embeddings to the tokenizer (``[SEG]``, ``<image>``; never shrink: Qwen pads its
    matrix past its tokenizer), then wrap."""
    if len(tokenizer) > vlm.get_input_embeddings().num_embeddings:
        vlm.resize_token_embeddings(len(tokenizer))
    return cls(vlm, image_token_id, image_size)

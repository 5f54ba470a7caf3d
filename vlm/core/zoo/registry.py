"""The zoo's entries: a name -> architecture + where weights come from + preprocessing.

As in timm/open_clip, an entry is data, not code: ``arch`` holds the real-size
hyper-parameters (embedded, so ``preset="real"`` never needs the network), ``hub_id`` says
where pretrained weights live, and ``tiny`` is the override that makes the same class small
for CPU tests. ``tiny_*`` entries are architecture-only (no ``hub_id``).
"""

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from vlm.core.zoo.errors import UnknownModelError

PRESETS = ("tiny", "real")


@dataclass(frozen=True)
class ImageSpec:
    """Preprocessing an encoder needs: resize the shorter side + centre-crop to ``size``, normalise."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class VisionEntry:
    """``family`` picks the builder: "clip" | "siglip" | "dinov2" (HF classes) or "timm"."""

    family: str
    image_spec: ImageSpec | None  # None: timm reads it from the model's pretrained_cfg
    arch: Mapping[str, Any] = field(default_factory=dict)  # HF config / timm kwargs, real size
    hub_id: str | None = None
    tiny: Mapping[str, Any] = field(default_factory=dict)
    timm_name: str | None = None


@dataclass(frozen=True)
class LLMEntry:
    """A causal LM. Its tokenizer is ``tokenizer_hub_id``, else ``hub_id``'s own: a base model
    can take its instruct sibling's tokenizer (same vocabulary) for the chat template.
    ``has_chat_template``: that tokenizer ships one (tiny entries use the in-process
    tokenizer's own template)."""

    model_type: str  # HF model_type, for AutoConfig.for_model
    arch: Mapping[str, Any]
    hub_id: str | None = None
    has_chat_template: bool = False
    tiny: Mapping[str, Any] = field(default_factory=dict)
    attn_implementation: str = "sdpa"
    tokenizer_hub_id: str | None = None

    @property
    def tokenizer_id(self) -> str | None:
        return self.tokenizer_hub_id or self.hub_id


# Tiny shapes: width 64, 2 blocks, 64 px, patch 16 -> a 4x4 grid. SigLIP shares CLIP's keys.
_TINY_VIT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=64, patch_size=16)
TINY_CLIP = _TINY_VIT | dict(intermediate_size=256)
TINY_DINOV2 = _TINY_VIT | dict(mlp_ratio=4)
TINY_TIMM = dict(embed_dim=64, depth=2, num_heads=4, img_size=64, patch_size=16)
# R+ViT hybrid: a ResNet-v2 stem (stride 4) under 2x2 patches, so each token sees a
# convolutional feature map; at 32 px that is a 4x4 grid, the CPU default's encoder.
TINY_HYBRID = dict(embed_dim=128, depth=3, num_heads=4, img_size=32, patch_size=2)


def _clip(width: int, layers: int, heads: int, patch: int, size: int) -> dict[str, Any]:
    return dict(
        hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
        num_attention_heads=heads, patch_size=patch, image_size=size,
    )  # fmt: skip


def _dinov2(width: int, layers: int, heads: int) -> dict[str, Any]:
    # image_size 518 is the checkpoint's position grid (37x37); inputs are 224 px, interpolated.
    return dict(
        hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
        mlp_ratio=4, patch_size=14, image_size=518,
    )  # fmt: skip


VISION_ENTRIES: dict[str, VisionEntry] = {
    "tiny_clip": VisionEntry("clip", ImageSpec(64, CLIP_MEAN, CLIP_STD), TINY_CLIP),
    "tiny_siglip": VisionEntry("siglip", ImageSpec(64, SIGLIP_MEAN, SIGLIP_STD), TINY_CLIP),
    "tiny_dinov2": VisionEntry("dinov2", ImageSpec(64, IMAGENET_MEAN, IMAGENET_STD), TINY_DINOV2),
    "tiny_timm_vit": VisionEntry("timm", None, TINY_TIMM, timm_name="vit_tiny_patch16_224"),
    "tiny_hybrid_vit": VisionEntry("timm", None, TINY_HYBRID, timm_name="vit_tiny_r_s16_p8_224"),
    "clip_vit_b32": VisionEntry(
        "clip", ImageSpec(224, CLIP_MEAN, CLIP_STD), _clip(768, 12, 12, 32, 224),
        "openai/clip-vit-base-patch32", TINY_CLIP,
    ),
    "clip_vit_b16": VisionEntry(
        "clip", ImageSpec(224, CLIP_MEAN, CLIP_STD), _clip(768, 12, 12, 16, 224),
        "openai/clip-vit-base-patch16", TINY_CLIP,
    ),
    "clip_vit_l14": VisionEntry(
        "clip", ImageSpec(224, CLIP_MEAN, CLIP_STD), _clip(1024, 24, 16, 14, 224),
        "openai/clip-vit-large-patch14", TINY_CLIP,
    ),
    "clip_vit_l14_336": VisionEntry(
        "clip", ImageSpec(336, CLIP_MEAN, CLIP_STD), _clip(1024, 24, 16, 14, 336),
        "openai/clip-vit-large-patch14-336", TINY_CLIP,
    ),
    # An HF CLIPModel checkpoint; CLIPVisionModel.from_pretrained keeps its vision part.
    "tinyclip_vit_40m": VisionEntry(
        "clip", ImageSpec(224, CLIP_MEAN, CLIP_STD), _clip(512, 12, 8, 32, 224),
        "wkcn/TinyCLIP-ViT-40M-32-Text-19M-LAION400M", TINY_CLIP,
    ),
    "siglip_b16": VisionEntry(
        "siglip", ImageSpec(224, SIGLIP_MEAN, SIGLIP_STD), _clip(768, 12, 12, 16, 224),
        "google/siglip-base-patch16-224", TINY_CLIP,
    ),
    "siglip_so400m": VisionEntry(
        "siglip", ImageSpec(384, SIGLIP_MEAN, SIGLIP_STD),
        _clip(1152, 27, 16, 14, 384) | dict(intermediate_size=4304),
        "google/siglip-so400m-patch14-384", TINY_CLIP,
    ),
    "dinov2_b": VisionEntry(
        "dinov2", ImageSpec(224, IMAGENET_MEAN, IMAGENET_STD), _dinov2(768, 12, 12),
        "facebook/dinov2-base", TINY_DINOV2,
    ),
    "dinov2_l": VisionEntry(
        "dinov2", ImageSpec(224, IMAGENET_MEAN, IMAGENET_STD), _dinov2(1024, 24, 16),
        "facebook/dinov2-large", TINY_DINOV2,
    ),
    # The HF classes by model_type, their architecture given in full by the config (an imported
    # llava-hf checkpoint's vision_config): the class defaults are only a starting point.
    "clip_vision_model": VisionEntry("clip", ImageSpec(224, CLIP_MEAN, CLIP_STD), tiny=TINY_CLIP),
    "siglip_vision_model": VisionEntry("siglip", ImageSpec(224, SIGLIP_MEAN, SIGLIP_STD), tiny=TINY_CLIP),
}  # fmt: skip

TIMM_PREFIX = "timm:"

# Tiny decoders share one shape; vocab 1024 matches the in-process tokenizer's default.
# Rotary models keep their max_position_embeddings (it allocates nothing and Llama-3's rope
# scaling is defined against it); learned position tables are cut to 512.
_TINY_LM = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=1024
)  # fmt: skip
TINY_LLAMA = _TINY_LM | dict(num_key_value_heads=2)
TINY_QWEN3 = TINY_LLAMA | dict(head_dim=16)
TINY_GPT_NEO = _TINY_LM | dict(
    attention_types=[[["global", "local"], 1]], window_size=16, max_position_embeddings=512
)  # fmt: skip
TINY_GPT2 = dict(n_embd=64, n_inner=128, n_layer=2, n_head=4, vocab_size=1024, n_positions=512)


def _llama(width, layers, heads, kv, inter, vocab=32000, **extra) -> dict[str, Any]:
    return dict(
        hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv, intermediate_size=inter, vocab_size=vocab, **extra,
    )  # fmt: skip


_LLAMA3_ROPE = dict(
    rope_type="llama3", rope_theta=500000.0, factor=32.0, low_freq_factor=1.0,
    high_freq_factor=4.0, original_max_position_embeddings=8192,
)  # fmt: skip
_QWEN_ROPE = dict(rope_type="default", rope_theta=1000000.0)
_LLAMA32_1B = _llama(
    2048, 16, 32, 8, 8192, 128256, max_position_embeddings=131072, rms_norm_eps=1e-5,
    head_dim=64, tie_word_embeddings=True, rope_parameters=_LLAMA3_ROPE,
    bos_token_id=128000, eos_token_id=[128001, 128008, 128009],
)  # fmt: skip

LLM_ENTRIES: dict[str, LLMEntry] = {
    "tiny_llama": LLMEntry("llama", TINY_LLAMA),
    "tiny_qwen2": LLMEntry("qwen2", TINY_LLAMA),
    "tiny_qwen3": LLMEntry("qwen3", TINY_QWEN3),
    "tiny_gpt_neo": LLMEntry("gpt_neo", TINY_GPT_NEO, attn_implementation="eager"),
    "tiny_gpt2": LLMEntry("gpt2", TINY_GPT2),
    "tinyllama_1.1b": LLMEntry(
        "llama", _llama(2048, 22, 32, 4, 5632, max_position_embeddings=2048, rms_norm_eps=1e-5),
        "TinyLlama/TinyLlama-1.1B-Chat-v1.0", True, TINY_LLAMA,
    ),
    "mobilellama_1.4b": LLMEntry(
        "llama", _llama(2048, 24, 16, 16, 5632, max_position_embeddings=2048, rms_norm_eps=1e-6),
        "mtgv/MobileLLaMA-1.4B-Chat", False, TINY_LLAMA,
    ),
    "mobilellama_2.7b": LLMEntry(
        "llama", _llama(2560, 32, 32, 32, 6912, max_position_embeddings=2048, rms_norm_eps=1e-6),
        "mtgv/MobileLLaMA-2.7B-Chat", False, TINY_LLAMA,
    ),
    # Llama-3.2-1B base: its own hub tokenizer has no chat template, the Instruct one (same
    # vocabulary) has, so tokenizer.name=auto takes that one.
    "llama3.2_1b": LLMEntry(
        "llama", _LLAMA32_1B, "meta-llama/Llama-3.2-1B", True, TINY_LLAMA,
        tokenizer_hub_id="meta-llama/Llama-3.2-1B-Instruct",
    ),
    "llama3.2_1b_instruct": LLMEntry(
        "llama", _LLAMA32_1B, "meta-llama/Llama-3.2-1B-Instruct", True, TINY_LLAMA
    ),
    "qwen2_0.5b": LLMEntry(
        "qwen2",
        _llama(
            896, 24, 14, 2, 4864, 151936, max_position_embeddings=32768, rms_norm_eps=1e-6,
            tie_word_embeddings=True, rope_parameters=_QWEN_ROPE,
            bos_token_id=151643, eos_token_id=151645,
        ),
        "Qwen/Qwen2-0.5B-Instruct", True, TINY_LLAMA,
    ),
    "qwen3_0.6b": LLMEntry(
        "qwen3",
        _llama(
            1024, 28, 16, 8, 3072, 151936, head_dim=128, max_position_embeddings=40960,
            rms_norm_eps=1e-6, tie_word_embeddings=True, rope_parameters=_QWEN_ROPE,
            bos_token_id=151643, eos_token_id=151645,
        ),
        "Qwen/Qwen3-0.6B", True, TINY_QWEN3,
    ),
    "qwen3_0.6b_base": LLMEntry(  # the sam_segmentation seed's text LLM: same shape, no chat tuning
        "qwen3",
        _llama(
            1024, 28, 16, 8, 3072, 151936, head_dim=128, max_position_embeddings=32768,
            rms_norm_eps=1e-6, tie_word_embeddings=True, rope_parameters=_QWEN_ROPE,
            bos_token_id=151643, eos_token_id=151643,
        ),
        "Qwen/Qwen3-0.6B-Base", True, TINY_QWEN3,
    ),
    "gpt_neo_125m": LLMEntry(
        "gpt_neo",
        dict(
            hidden_size=768, num_layers=12, num_heads=12, vocab_size=50257,
            max_position_embeddings=2048, attention_types=[[["global", "local"], 6]],
            window_size=256, embed_dropout=0.0, resid_dropout=0.0, attention_dropout=0.0,
        ),
        "EleutherAI/gpt-neo-125m", False, TINY_GPT_NEO, attn_implementation="eager",
    ),
    "gpt2": LLMEntry(
        "gpt2", dict(n_embd=768, n_layer=12, n_head=12, vocab_size=50257, n_positions=1024),
        "openai-community/gpt2", False, TINY_GPT2,
    ),
    # By model_type, the architecture given in full by the config (an imported llava-hf
    # checkpoint's text_config), as the vision entries above.
    "llama": LLMEntry("llama", {}, tiny=TINY_LLAMA),
    "mistral": LLMEntry("mistral", {}, tiny=TINY_LLAMA),
    "qwen2": LLMEntry("qwen2", {}, tiny=TINY_LLAMA),
}  # fmt: skip


def vision_entry(name: str) -> VisionEntry:
    """The entry for ``name``; ``timm:<model>`` makes one for any timm ViT on the fly."""
    if name.startswith(TIMM_PREFIX):
        return VisionEntry("timm", None, tiny=TINY_TIMM, timm_name=name[len(TIMM_PREFIX) :])
    if name not in VISION_ENTRIES:
        raise UnknownModelError("vision tower", name, [*VISION_ENTRIES, f"{TIMM_PREFIX}<timm vit>"])
    return VISION_ENTRIES[name]


def llm_entry(name: str) -> LLMEntry:
    if name not in LLM_ENTRIES:
        raise UnknownModelError("llm", name, LLM_ENTRIES)
    return LLM_ENTRIES[name]


def reject_unknown(defaults: object, overrides: Mapping[str, Any], name: str) -> None:
    """HF configs silently keep any keyword, so a typo in an override must fail here."""
    unknown = sorted(k for k in overrides if not hasattr(defaults, k))
    if unknown:
        raise ValueError(f"{name}: unknown config keys {unknown}")


def arch_config(entry: VisionEntry | LLMEntry, preset: str, overrides: Mapping[str, Any]) -> dict:
    """Hyper-parameters for a random-init build: the entry's real size, shrunk by its
    ``tiny`` override for ``preset="tiny"``, then the caller's overrides on top."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {PRESETS}")
    return dict(entry.arch) | (dict(entry.tiny) if preset == "tiny" else {}) | dict(overrides)

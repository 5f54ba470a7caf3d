"""Model zoo: towers reproduce HF hidden states, every entry builds, pretrained resolution is
offline-first with a one-line error, real-size configs match the published parameter counts."""

from pathlib import Path

import pytest
import timm
import torch
from huggingface_hub import constants
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPModel, GPT2Config, GPT2LMHeadModel

from vlm.core.zoo.encoders import build_vision_tower
from vlm.core.zoo.errors import CheckpointMissingError, UnknownModelError
from vlm.core.zoo.llms import build_llm, decoder_layers
from vlm.core.zoo.registry import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    LLM_ENTRIES,
    VISION_ENTRIES,
)

torch.set_num_threads(1)


def _image(size: int, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


def _n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------- hidden-state equivalence


@pytest.mark.parametrize("name", ["tiny_clip", "tiny_siglip", "tiny_dinov2"])
@pytest.mark.parametrize("preset,image_size", [("tiny", None), ("real", 96)])
def test_tower_matches_hf_hidden_states(name, preset, image_size):
    """``preset=real`` on a tiny entry keeps the 64 px position grid, so 96 px inputs take the
    interpolation path: it must match HF's own ``interpolate_pos_encoding``."""
    tower = build_vision_tower(name, preset=preset, image_size=image_size).eval()
    x = _image(tower.image_spec.size)
    kwargs = {} if name == "tiny_dinov2" or image_size is None else {"interpolate_pos_encoding": True}
    with torch.no_grad():
        ours = tower(x)
        ref = tower.model(pixel_values=x, output_hidden_states=True, **kwargs).hidden_states
        h = tower.embed(x)
        loop = [h]
        for i in range(tower.depth):
            h = tower.run_block(i, h)
            loop.append(h)
    assert len(ours) == len(ref) == tower.depth + 1
    for a, b, c in zip(ours, ref, loop, strict=True):
        assert torch.allclose(a, b, atol=1e-6)
        assert torch.equal(a, c)
    assert ours[-1].shape == (2, tower.num_prefix_tokens + tower.num_patches, tower.hidden_size)


def test_clip_embed_is_after_pre_layrnorm():
    tower = build_vision_tower("tiny_clip").eval()
    x = _image(64)
    with torch.no_grad():
        raw = tower.model.embeddings(x)
        assert torch.equal(tower.embed(x), tower.model.pre_layrnorm(raw))
        assert not torch.allclose(tower.embed(x), raw)


def test_timm_tower_matches_timm_features():
    tower = build_vision_tower("timm:vit_small_patch16_224").eval()
    x = _image(64)
    with torch.no_grad():
        ours = tower(x)
        ref = tower.model.forward_intermediates(
            x, norm=False, output_fmt="NLC", intermediates_only=True, return_prefix_tokens=True
        )
    assert tower.depth == 2 and tower.num_prefix_tokens == 1 and tower.num_patches == 16
    for h, (patches, prefix) in zip(ours[1:], ref, strict=True):
        assert torch.allclose(h, torch.cat([prefix, patches], dim=1), atol=1e-6)


# ------------------------------------------------------------------- every entry builds


@pytest.mark.parametrize("name", [*VISION_ENTRIES, "timm:vit_base_patch16_224"])
def test_tiny_preset_builds_every_tower(name):
    tower = build_vision_tower(name)
    states = tower(_image(tower.image_spec.size, batch=1))
    assert len(states) == tower.depth + 1
    assert tower.hidden_size <= 192 and tower.depth <= 4 and tower.image_spec.size <= 64
    assert states[-1].shape == (1, tower.num_prefix_tokens + tower.num_patches, tower.hidden_size)


@pytest.mark.parametrize(
    "name", ["tiny_clip", "tiny_siglip", "tiny_dinov2", "tiny_timm_vit", "tiny_hybrid_vit"]
)
def test_every_tower_parameter_gets_a_gradient_or_is_never_run(name):
    """Heads, final norms and mask tokens stay (the hub checkpoint's keys) but are never run:
    every other parameter gets a gradient, and those are exactly what ``never_run`` names,
    which recipes keep frozen so an unfrozen tower under DDP waits for no gradient."""
    tower = build_vision_tower(name)
    tower(_image(tower.image_spec.size, batch=1))[-1].sum().backward()
    pieces = tower.never_run()
    never = {id(p) for x in pieces for p in ([x] if isinstance(x, torch.nn.Parameter) else x.parameters())}
    assert [n for n, p in tower.named_parameters() if p.grad is None and id(p) not in never] == []
    assert all(p.grad is None for p in tower.parameters() if id(p) in never)
    if name in ("tiny_clip", "tiny_siglip"):
        assert tower.model.post_layernorm in pieces


def test_tiny_overrides_and_image_size():
    tower = build_vision_tower("tiny_clip", hidden_size=128, num_hidden_layers=4, patch_size=8, image_size=32)
    assert (tower.hidden_size, tower.depth, tower.num_patches) == (128, 4, 16)
    assert tower.model.config.image_size == 32  # tiny builds at the size, no interpolation
    assert tower(_image(32, batch=1))[-1].shape == (1, 17, 128)


def test_coord_channels_give_a_conv_stem_where_each_pixel_is():
    """CoordConv inputs: the first convolution reads the pixels unchanged plus x and y ramps
    as two more channels; without the option the tower is the plain 3-channel one."""
    tower = build_vision_tower("tiny_hybrid_vit", coord_channels=True).eval()
    stem = next(m for m in tower.model.patch_embed.modules() if isinstance(m, torch.nn.Conv2d))
    assert tower.coord_channels and stem.in_channels == 5
    seen = []
    stem.register_forward_hook(lambda mod, args, out: seen.append(args[0]))
    x = _image(32)
    tower.embed(x)
    (inputs,) = seen
    assert torch.equal(inputs[:, :3], x)
    assert torch.equal(inputs[0, 3, 5], torch.linspace(-1, 1, 32)) and torch.equal(
        inputs[0, 4, :, 7], torch.linspace(-1, 1, 32)
    )
    plain = build_vision_tower("tiny_hybrid_vit")
    assert not plain.coord_channels and plain.embed(x).shape == tower.embed(x).shape


def test_unknown_override_key_fails():
    with pytest.raises(ValueError, match="hiden_size"):
        build_vision_tower("tiny_clip", hiden_size=128)
    with pytest.raises(ValueError, match="num_layer"):
        build_llm("tiny_llama", num_layer=3)


@pytest.mark.parametrize("name", LLM_ENTRIES)
def test_tiny_preset_builds_every_llm(name):
    llm = build_llm(name, vocab_size=300)
    assert llm.get_input_embeddings().num_embeddings == 300
    assert len(decoder_layers(llm)) == llm.config.num_hidden_layers == 2
    logits = llm(torch.randint(0, 300, (1, 6))).logits
    assert logits.shape == (1, 6, 300)
    # hub special-token ids (e.g. 50256) do not survive a 300-token vocabulary
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        ids = getattr(llm.config, key)
        assert all(i < 300 for i in ([] if ids is None else [ids] if isinstance(ids, int) else ids))


def test_llm_attention_and_template_metadata():
    assert build_llm("tiny_llama").config._attn_implementation == "sdpa"
    assert build_llm("tiny_llama", attn_implementation="eager").config._attn_implementation == "eager"
    tower = build_vision_tower("tiny_siglip", attn_implementation="eager")
    assert tower.model.config._attn_implementation == "eager"
    assert LLM_ENTRIES["llama3.2_1b"].has_chat_template
    assert not LLM_ENTRIES["gpt2"].has_chat_template
    assert LLM_ENTRIES["qwen3_0.6b"].tokenizer_id == "Qwen/Qwen3-0.6B"


def test_decoder_layers_sees_through_peft():
    llm = build_llm("tiny_llama")
    layers = decoder_layers(llm)
    wrapped = get_peft_model(llm, LoraConfig(r=2, target_modules=["q_proj"]))
    assert decoder_layers(wrapped) is layers


# ------------------------------------------------- real-size configs, no weights allocated

REAL_TOWERS = {  # name: (params in millions, depth, width, patches at the default size)
    "clip_vit_b32": (87.5, 12, 768, 49),
    "clip_vit_b16": (85.8, 12, 768, 196),
    "clip_vit_l14": (303.2, 24, 1024, 256),
    "clip_vit_l14_336": (303.5, 24, 1024, 576),
    "tinyclip_vit_40m": (39.4, 12, 512, 49),
    "siglip_b16": (92.9, 12, 768, 196),  # with the attention-pool head (kept, never run)
    "siglip_so400m": (428.2, 27, 1152, 729),
    "dinov2_b": (86.6, 12, 768, 256),  # 224 px, patch 14 -> 16x16
    "dinov2_l": (304.4, 24, 1024, 256),
}


@pytest.mark.parametrize("name", REAL_TOWERS)
def test_real_preset_tower_shapes(name):
    params, depth, width, patches = REAL_TOWERS[name]
    with torch.device("meta"):
        tower = build_vision_tower(name, preset="real")
        out = tower(torch.empty(1, 3, tower.image_spec.size, tower.image_spec.size))[-1]
    assert _n_params(tower) / 1e6 == pytest.approx(params, rel=0.01)
    assert (tower.depth, tower.hidden_size, tower.num_patches) == (depth, width, patches)
    assert out.shape == (1, tower.num_prefix_tokens + patches, width)


REAL_LLMS = {  # name: (params in billions, layers, width)
    "tinyllama_1.1b": (1.100, 22, 2048),
    "mobilellama_1.4b": (1.364, 24, 2048),
    "mobilellama_2.7b": (2.702, 32, 2560),
    "llama3.2_1b": (1.236, 16, 2048),
    "qwen2_0.5b": (0.494, 24, 896),
    "qwen3_0.6b": (0.596, 28, 1024),
    "gpt_neo_125m": (0.125, 12, 768),
    "gpt2": (0.124, 12, 768),
}


@pytest.mark.parametrize("name", REAL_LLMS)
def test_real_preset_llm_sizes(name):
    params, layers, width = REAL_LLMS[name]
    with torch.device("meta"):
        llm = build_llm(name, preset="real")
    assert _n_params(llm) / 1e9 == pytest.approx(params, rel=0.01)
    assert len(decoder_layers(llm)) == layers and llm.config.hidden_size == width


def test_real_preset_keeps_hub_architecture_details():
    with torch.device("meta"):
        llama3 = build_llm("llama3.2_1b", preset="real")
        neo = build_llm("gpt_neo_125m", preset="real")
    assert llama3.config.tie_word_embeddings and llama3.config.num_key_value_heads == 8
    assert llama3.config.rope_parameters["rope_theta"] == 500000.0
    assert neo.config.attention_layers == ["global", "local"] * 6


def test_image_specs():
    assert build_vision_tower("clip_vit_l14").image_spec.mean == CLIP_MEAN
    spec = VISION_ENTRIES["clip_vit_l14_336"].image_spec
    assert (spec.size, spec.mean, spec.std) == (336, CLIP_MEAN, CLIP_STD)
    spec = VISION_ENTRIES["siglip_so400m"].image_spec
    assert (spec.size, spec.mean, spec.std) == (384, (0.5,) * 3, (0.5,) * 3)
    spec = VISION_ENTRIES["dinov2_l"].image_spec
    assert (spec.size, spec.mean, spec.std) == (224, IMAGENET_MEAN, IMAGENET_STD)
    # timm: read from the model's pretrained_cfg (augreg ViTs use 0.5)
    assert build_vision_tower("tiny_timm_vit").image_spec.mean == (0.5, 0.5, 0.5)


# ----------------------------------------------------------------- pretrained resolution


@pytest.fixture
def hf_cache(tmp_path, monkeypatch) -> Path:
    """An empty HF cache; ``_snapshot`` puts files in it the way ``hf download`` would."""
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    return tmp_path


def _snapshot(cache: Path, hub_id: str) -> Path:
    repo = cache / f"models--{hub_id.replace('/', '--')}"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    folder = repo / "snapshots" / commit
    folder.mkdir(parents=True)
    return folder


@pytest.mark.parametrize(
    "build,hub_id",
    [
        (lambda: build_vision_tower("clip_vit_l14", pretrained=True), "openai/clip-vit-large-patch14"),
        (lambda: build_vision_tower("dinov2_l", pretrained=True), "facebook/dinov2-large"),
        (lambda: build_llm("tinyllama_1.1b", pretrained=True), "TinyLlama/TinyLlama-1.1B-Chat-v1.0"),
        (
            lambda: build_vision_tower("timm:vit_tiny_patch16_224", pretrained=True),
            "timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k",
        ),
    ],
)
def test_missing_checkpoint_is_one_line(hf_cache, build, hub_id):
    with pytest.raises(CheckpointMissingError) as err:
        build()
    message = str(err.value)
    assert "\n" not in message
    assert f"'{hub_id}'" in message and f"hf download {hub_id}" in message
    assert str(hf_cache) in message and "pretrained=false" in message


def test_snapshot_without_weights_counts_as_missing(hf_cache):
    """A tokenizer load caches config/tokenizer files only; that is not a checkpoint."""
    _snapshot(hf_cache, "openai-community/gpt2").joinpath("config.json").write_text("{}")
    with pytest.raises(CheckpointMissingError, match="openai-community/gpt2"):
        build_llm("gpt2", pretrained=True)


def test_pretrained_clip_loads_vision_part_from_cache(hf_cache):
    """TinyCLIP and OpenAI CLIP ship whole CLIPModel checkpoints; the tower keeps the vision part."""
    tiny = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    clip = CLIPModel(
        CLIPConfig(
            text_config=tiny, vision_config=tiny | dict(image_size=64, patch_size=16), projection_dim=32
        )
    )
    clip.save_pretrained(_snapshot(hf_cache, "wkcn/TinyCLIP-ViT-40M-32-Text-19M-LAION400M"))
    tower = build_vision_tower("tinyclip_vit_40m", pretrained=True, image_size=64)
    expected = clip.vision_model.encoder.layers[1].mlp.fc1.weight
    assert torch.equal(tower.blocks[1].mlp.fc1.weight, expected)
    assert tower.model.dtype == torch.float32 and tower.image_spec.mean == CLIP_MEAN
    assert tower(_image(64))[-1].shape == (2, 17, 64)


def test_pretrained_llm_grows_embeddings_for_new_tokens(hf_cache):
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=64))
    gpt2.save_pretrained(_snapshot(hf_cache, "openai-community/gpt2"))
    llm = build_llm("gpt2", pretrained=True, vocab_size=102)
    table = llm.get_input_embeddings().weight
    assert table.shape == (102, 32)
    assert torch.equal(table[:100], gpt2.get_input_embeddings().weight)
    assert build_llm("gpt2", pretrained=True, vocab_size=50).get_input_embeddings().num_embeddings == 100


def test_pretrained_timm_loads_from_cache(hf_cache):
    small = dict(depth=2, embed_dim=64, num_heads=4, patch_size=16)
    source = timm.create_model("vit_tiny_patch16_224", img_size=64, **small)
    folder = _snapshot(hf_cache, "timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k")
    save_file(source.state_dict(), folder / "model.safetensors")
    tower = build_vision_tower("timm:vit_tiny_patch16_224", pretrained=True, image_size=64, **small)
    assert torch.equal(tower.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)


def test_architecture_only_entries_refuse_pretrained():
    with pytest.raises(ValueError, match="no pretrained weights"):
        build_vision_tower("tiny_clip", pretrained=True)
    with pytest.raises(ValueError, match="no pretrained weights"):
        build_llm("tiny_llama", pretrained=True)


# ------------------------------------------------------------------------ unknown names


def test_unknown_names_list_the_known_ones():
    with pytest.raises(UnknownModelError, match=r"clip_vit_l14.*timm:<timm vit>"):
        build_vision_tower("clip_vit_h14")
    with pytest.raises(UnknownModelError, match=r"known: .*qwen3_0\.6b"):
        build_llm("llama_7b")
    with pytest.raises(ValueError, match="preset"):
        build_vision_tower("clip_vit_l14", preset="huge")

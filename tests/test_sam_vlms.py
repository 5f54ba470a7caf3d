"""``mode=vlm`` backbones (``vlm.families.sam_segmentation.vlms``) on the tiny presets of every
supported VLM class: the taken-apart VLM computes what the VLM computes (the splice and text
path against its own top-level forward, written in its own image-token id and format), left
padding changes nothing, M-RoPE follows Qwen2-VL's layout, recipes reach the right parameters,
and the refusals are one line each."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Blip2Config, LlavaConfig, Qwen2VLImageProcessor

from vlm.core.recipes import PartTune, apply_tune
from vlm.core.tokenizer import IMAGE_TOKEN, train_tokenizer
from vlm.core.zoo.errors import CheckpointMissingError
from vlm.families.sam_segmentation import vlms
from vlm.families.sam_segmentation.vlms import TINY, build_vlm_backbone

pytestmark = pytest.mark.usefixtures("single_thread")

NAMES = list(TINY)
TEXT = ["a red circle left of a blue square", "what colour is the shape", "It is [SEG]."]


@pytest.fixture(scope="module")
def tok():
    tok = train_tokenizer(TEXT * 3, vocab_size=200)
    tok.add_special_tokens({"extra_special_tokens": ["[SEG]"]}, replace_extra_special_tokens=False)
    return tok


def build(name, tok, **kw):
    torch.manual_seed(0)
    return build_vlm_backbone(name, tok, tok.convert_tokens_to_ids(IMAGE_TOKEN), **kw).eval()


def images(bb, n, seed=0):
    """``n`` random RGB images already at the tower's size (no resampling differences)."""
    rng = np.random.default_rng(seed)
    size = bb.image_spec.size
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def pixels(bb, pics):
    return torch.stack([bb.image_transforms()["vision"](p) for p in pics])


def sequence(bb, tok, image_id, pad_right=0, pad_left=0):
    """Text, the image span, text (PaliGemma: its own layout, the image first), padded."""
    words = tok("what colour is the shape", add_special_tokens=False)["input_ids"]
    answer = tok("It is [SEG].", add_special_tokens=False)["input_ids"]
    span = [image_id] * bb.num_image_tokens
    if bb.model_type == "paligemma":
        ids = span + [tok.bos_token_id, *words, *answer]
    else:
        ids = [tok.bos_token_id, *words[:2], *span, *words[2:], *answer]
    mask = [0] * pad_left + [1] * len(ids) + [0] * pad_right
    ids = [tok.pad_token_id] * pad_left + ids + [tok.pad_token_id] * pad_right
    return torch.tensor(ids), torch.tensor(mask)


@pytest.mark.parametrize("name", NAMES)
def test_shapes_and_parts(name, tok):
    bb = build(name, tok)
    side = bb.image_spec.size
    px = pixels(bb, images(bb, 2))
    assert px.shape == (2, 3, side, side)
    tokens, grid = bb.encode_image(px)
    assert tokens.shape == (2, bb.num_image_tokens, bb.hidden_size)
    assert grid.shape == (2, bb.grid_channels, *bb.grid_size)
    ids, mask = sequence(bb, tok, bb.image_token_id)
    hidden, grid = bb(ids.expand(2, -1), mask.expand(2, -1), px)
    assert hidden.shape == (2, len(ids), bb.hidden_size)
    # every parameter in exactly one part; blocks inside their part; the LM head in `llm`
    parts = bb.parts()
    owners = [id(p) for part in parts.values() for p in part.parameters()]
    assert sorted(owners) == sorted({id(p) for p in bb.parameters()})
    for part in ("vision_tower", "llm"):
        assert {id(p) for p in bb.blocks(part).parameters()} <= {id(p) for p in parts[part].parameters()}
    assert bb.blocks("llm") is bb.text_model.layers and len(bb.blocks("vision_tower")) == 2
    assert bb.output_embeddings() in list(parts["llm"].modules())


def own_forward_inputs(bb, ids, mask, pics, own_id):
    """The VLM's own top-level inputs for the same sample, in its own image-token id."""
    own_ids = ids.masked_fill(ids == bb.image_token_id, own_id)
    kw = dict(input_ids=own_ids, attention_mask=mask, pixel_values=pixels(bb, pics))
    if bb.model_type in ("idefics3", "smolvlm"):
        kw["pixel_values"] = kw["pixel_values"][:, None]  # (B, images, 3, S, S)
    elif bb.model_type == "qwen2_vl":
        vision, side = bb.vlm.config.vision_config, bb.image_spec.size
        proc = Qwen2VLImageProcessor(
            size={"shortest_edge": side * side, "longest_edge": side * side},
            patch_size=vision.patch_size, merge_size=vision.spatial_merge_size,
            temporal_patch_size=vision.temporal_patch_size,
        )  # fmt: skip
        out = proc(pics, return_tensors="pt")
        kw.update(pixel_values=out["pixel_values"], image_grid_thw=out["image_grid_thw"])
        kw["mm_token_type_ids"] = (own_ids == own_id).int()
    elif bb.model_type == "paligemma":  # the image span is the bidirectional prefix
        idx = torch.arange(ids.shape[1])
        last = torch.where(own_ids == own_id, idx, -1).amax(-1, keepdim=True)
        kw["token_type_ids"] = (idx > last).long()
    return kw


@pytest.mark.parametrize("name", NAMES)
def test_the_spliced_path_is_the_vlms_own_forward(name, tok):
    """Our ``<image>`` id (4) in our sequence vs the VLM's own id (here ``<unk>``) in its own
    forward: same logits on every real token, a right-padded row included."""
    bb = build(name, tok)
    own_id = tok.unk_token_id
    bb.vlm.config.image_token_id = own_id
    pics = images(bb, 2)
    a, ma = sequence(bb, tok, bb.image_token_id, pad_right=3)
    b, mb = sequence(bb, tok, bb.image_token_id)
    b, mb = torch.cat([b, b[-3:]]), torch.cat([mb, mb[-3:]])  # longer, unpadded second row
    ids, mask = torch.stack([a, b]), torch.stack([ma, mb])
    with torch.no_grad():
        hidden, _ = bb(ids, mask, pixels(bb, pics))
        ours = bb.output_embeddings()(hidden)
        theirs = bb.vlm(**own_forward_inputs(bb, ids, mask, pics, own_id)).logits
    valid = mask.bool()
    torch.testing.assert_close(ours[valid], theirs[valid], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_left_padding_changes_nothing(name, tok):
    bb = build(name, tok)
    px = pixels(bb, images(bb, 1))
    ids, mask = sequence(bb, tok, bb.image_token_id)
    pids, pmask = sequence(bb, tok, bb.image_token_id, pad_left=3)
    with torch.no_grad():
        plain, _ = bb(ids[None], mask[None], px)
        padded, _ = bb(pids[None], pmask[None], px)
    torch.testing.assert_close(padded[:, 3:], plain, atol=1e-5, rtol=1e-5)


def test_qwen2_vl_positions_are_m_rope(tok):
    """Text counts on, the 2 x 2 merged image takes (t, h, w) from where the text stopped, the
    text after resumes at max + 1; left padding shifts nothing."""
    bb = build("tiny_qwen2_vl", tok)
    img = bb.image_token_id
    ids = torch.tensor([[0, 0, 7, 8, 9, img, img, img, img, 10, 11]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1]])
    pos = bb.text_inputs(mask, ids)["position_ids"][:, 0, 2:]
    expected = [
        [0, 1, 2, 3, 3, 3, 3, 5, 6],  # temporal
        [0, 1, 2, 3, 3, 4, 4, 5, 6],  # height
        [0, 1, 2, 3, 4, 3, 4, 5, 6],  # width
    ]
    assert pos.tolist() == expected


def test_qwen2_vl_grid_is_row_major(tok):
    """The tower's merge-window token order is undone: grid[..., i, j] is patch (i, j)."""
    bb = build("tiny_qwen2_vl", tok)
    h, w = bb.grid_size
    m = bb.vlm.config.vision_config.spatial_merge_size
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    order = (
        torch.stack([rows, cols], -1).reshape(h // m, m, w // m, m, 2).transpose(1, 2).reshape(1, h * w, 2)
    )
    grid = bb.to_grid(order.float())
    assert torch.equal(grid[0, 0], rows.float()) and torch.equal(grid[0, 1], cols.float())


@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_connector_and_lora_never_the_frozen_tower(name, tok):
    """LISA's recipe (tower frozen, connector full, LoRA on the LLM's blocks), checkpointing on."""
    bb = build(name, tok).train()
    bb.gradient_checkpointing_enable()
    tunes = {
        "vision_tower": PartTune(type="frozen"),
        "connector": PartTune(type="full"),
        "llm": PartTune(type="lora"),
    }
    for part, module in bb.parts().items():
        apply_tune(module, tunes[part], bb.blocks(part), part)
    px = pixels(bb, images(bb, 2))
    ids, mask = sequence(bb, tok, bb.image_token_id)
    grad_mode = []
    bb.blocks("vision_tower")[0].register_forward_pre_hook(
        lambda *_: grad_mode.append(torch.is_grad_enabled())
    )
    hidden, grid = bb(ids.expand(2, -1), mask.expand(2, -1), px)
    assert grad_mode == [False] and not grid.requires_grad  # the frozen tower ran under no_grad
    hidden.pow(2).mean().backward()
    parts = bb.parts()
    assert all(p.grad is None for p in parts["vision_tower"].parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in parts["connector"].parameters())
    lora = {n: p for n, p in parts["llm"].named_parameters() if "lora_" in n}
    assert lora and all(p.grad is not None for p in lora.values())
    assert any(p.grad.abs().sum() > 0 for n, p in lora.items() if "lora_B" in n)
    assert all(p.grad is None for n, p in parts["llm"].named_parameters() if "lora_" not in n)


@pytest.mark.parametrize("name", ["tiny_llava", "tiny_qwen2_vl"])
def test_a_trained_tower_gets_gradients_except_what_no_output_reads(name, tok):
    """Tower trained (full) with checkpointing on: every tower parameter but ``unused()``'s
    gets a gradient (LLaVA reads block -2: its last block and post-LayerNorm get none)."""
    bb = build(name, tok).train()
    bb.gradient_checkpointing_enable()
    unused = {id(p) for m in bb.unused() for p in m.parameters()}
    assert bool(unused) == (name == "tiny_llava")
    px = pixels(bb, images(bb, 2))
    ids, mask = sequence(bb, tok, bb.image_token_id)
    grad_mode = []
    bb.blocks("vision_tower")[0].register_forward_pre_hook(
        lambda *_: grad_mode.append(torch.is_grad_enabled())
    )
    hidden, grid = bb(ids.expand(2, -1), mask.expand(2, -1), px)
    assert grad_mode[0] and grid.requires_grad
    (hidden.pow(2).mean() + grid.pow(2).mean()).backward()
    for p in bb.parts()["vision_tower"].parameters():
        assert (p.grad is None) == (id(p) in unused)


@pytest.mark.parametrize("name", NAMES)
def test_normalisation_is_the_vlms_own(name, tok):
    bb = build(name, tok)
    proc = bb.image_processor
    assert bb.image_spec.mean == tuple(proc.image_mean) and bb.image_spec.std == tuple(proc.image_std)


def test_qwen2_vl_image_size_is_a_multiple_of_patch_times_merge(tok):
    assert build("tiny_qwen2_vl", tok, image_size=64).num_image_tokens == 16
    with pytest.raises(ValueError, match="multiple of patch x merge = 16"):
        build("tiny_qwen2_vl", tok, image_size=40)
    with pytest.raises(ValueError, match="only qwen2_vl resizes"):
        build("tiny_llava", tok, image_size=64)


def test_real_shapes_without_a_cached_config(tok):
    """preset=real offline: the embedded shapes of the conf/vlm checkpoints (built on meta)."""
    expected = {
        "llava-hf/llava-1.5-7b-hf": (576, 4096, (24, 24), 1024),
        "google/paligemma-3b-pt-224": (256, 2048, (16, 16), 1152),
        "Qwen/Qwen2-VL-2B-Instruct": (256, 1536, (32, 32), 1280),
        "HuggingFaceTB/SmolVLM-256M-Instruct": (64, 576, (32, 32), 768),
    }
    for hub_id, (tokens, hidden, grid, channels) in expected.items():
        with torch.device("meta"):
            bb = build_vlm_backbone(hub_id, tok, 4, preset="real")
        assert (bb.num_image_tokens, bb.hidden_size, bb.grid_size, bb.grid_channels) == (
            tokens,
            hidden,
            grid,
            channels,
        )
    with pytest.raises(ValueError, match="no config.json in the local HF cache") as err:
        build_vlm_backbone("someone/unknown-vlm", tok, 4, preset="real")
    assert "\n" not in str(err.value)


def test_an_unsupported_model_type_names_the_supported_ones(tok, monkeypatch):
    monkeypatch.setattr(vlms.AutoConfig, "from_pretrained", lambda *a, **k: Blip2Config())
    with pytest.raises(ValueError, match="'blip-2' is not supported: choose from llava, idefics3") as err:
        build_vlm_backbone("Salesforce/blip2-opt-2.7b", tok, 4, preset="real")
    assert "\n" not in str(err.value)


def test_refusals_are_one_line(tok):
    if not torch.cuda.is_available():
        with pytest.raises(
            ValueError, match="needs bitsandbytes on a CUDA device and this machine has none"
        ) as err:
            build_vlm_backbone("llava-hf/llava-1.5-7b-hf", tok, 4, pretrained=True, load_in="4bit")
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="needs vlm.pretrained=true"):
        build_vlm_backbone("tiny_llava", tok, 4, load_in="8bit")
    with pytest.raises(ValueError, match="choose from 4bit, 8bit"):
        build_vlm_backbone("tiny_llava", tok, 4, pretrained=True, load_in="2bit")
    with pytest.raises(ValueError, match="unknown config keys"):
        build_vlm_backbone("tiny_llava", tok, 4, vision_feature_layr=-1)
    with pytest.raises(ValueError, match="needs pretrained=true or preset=real"):
        build_vlm_backbone("llava-hf/llava-1.5-7b-hf", tok, 4)


def test_a_missing_checkpoint_offline_names_the_hub_id(tok):
    with pytest.raises(
        CheckpointMissingError, match="'google/paligemma-3b-pt-224'.*vlm.pretrained=false"
    ) as err:
        build_vlm_backbone("google/paligemma-3b-pt-224", tok, 4, pretrained=True)
    assert "\n" not in str(err.value)


def test_overrides_reach_the_config(tok):
    bb = build("tiny_llava", tok, vision_feature_layer=-1, text_config={"num_hidden_layers": 3})
    assert len(bb.blocks("llm")) == 3 and bb.unused() == [bb.tower.post_layernorm]


def test_embeddings_grow_to_a_tokenizer_that_gained_tokens(tok, monkeypatch):
    """A hub config's vocabulary short of the tokenizer ([SEG], <image> added) grows to it."""
    small = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4)
    cached = LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", image_size=32, patch_size=8, **small),
        text_config=dict(model_type="llama", vocab_size=len(tok) - 2, **small),
    )
    monkeypatch.setattr(vlms.AutoConfig, "from_pretrained", lambda *a, **k: cached)
    bb = build_vlm_backbone("llava-hf/llava-1.5-7b-hf", tok, 4, preset="real")
    assert bb.input_embeddings().num_embeddings == bb.output_embeddings().out_features == len(tok)

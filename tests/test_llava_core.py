"""The LLaVA-style core: image features land in the image-token slots, the loss covers only
labelled tokens, generation uses the KV cache, and recipes train exactly what they say."""

import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image
from runs import encode_batch

from vlm.cli.build import build_module
from vlm.cli.common import CONFIG_DIR
from vlm.core.connectors import Connector
from vlm.core.llava import LlavaModel
from vlm.core.processor import VLMProcessor, image_transform
from vlm.core.recipes import PartTune, apply_tune
from vlm.core.templates import build_template
from vlm.core.tokenizer import IGNORE_INDEX, IMAGE_TOKEN, train_tokenizer
from vlm.core.zoo.encoders import build_vision_tower
from vlm.core.zoo.llms import build_llm, decoder_layers

CONV = [
    {"from": "human", "value": "<image>\nWhat color is the circle?"},
    {"from": "gpt", "value": "red"},
    {"from": "human", "value": "Is there a square?"},
    {"from": "gpt", "value": "no"},
]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer([t["value"] for t in CONV] * 4, vocab_size=200)


def make(tokenizer, llm_name="tiny_llama"):
    torch.manual_seed(0)
    tower = build_vision_tower("tiny_clip")
    llm = build_llm(llm_name, vocab_size=len(tokenizer))
    conn = Connector(tower.hidden_size, llm.config.hidden_size)
    model = LlavaModel(tower, conn, llm, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    proc = VLMProcessor(
        tokenizer,
        build_template("auto", tokenizer),
        {"v": image_transform(tower.image_spec)},
        model.num_image_tokens,
    )
    return model, proc


def batch_of(proc, n=2, prompts=False):
    imgs = [Image.new("RGB", (64, 64), c) for c in ["red", "blue", "green"][:n]]
    return encode_batch(proc, [{"image": im, "conversations": CONV} for im in imgs], prompts)


def test_features_replace_exactly_the_image_slots(tokenizer):
    model, proc = make(tokenizer)
    batch = batch_of(proc)
    embeds = model.embed_inputs(batch["input_ids"], batch["pixel_values"])
    feats = model.encode_images(batch["pixel_values"])
    slots = batch["input_ids"] == model.image_token_id
    assert slots.sum(1).tolist() == [model.num_image_tokens] * 2
    assert torch.equal(embeds[0][slots[0]], feats[0]) and torch.equal(embeds[1][slots[1]], feats[1])
    text = model.llm.get_input_embeddings()(batch["input_ids"].masked_fill(slots, 0))
    assert torch.equal(embeds[~slots], text[~slots])


def test_select_layer_is_the_penultimate_block(tokenizer):
    model, proc = make(tokenizer)
    pix = batch_of(proc)["pixel_values"]
    states = model.vision_tower(pix)
    expected = model.connector(states[-2][:, model.vision_tower.num_prefix_tokens :])
    assert torch.allclose(model.encode_images(pix), expected, atol=1e-6)


def test_select_layer_past_depth_is_a_clear_error(tokenizer):
    tower = build_vision_tower("tiny_clip")
    llm = build_llm("tiny_llama", vocab_size=len(tokenizer))
    with pytest.raises(ValueError, match="outside the 2-block encoder"):
        LlavaModel(tower, Connector(64, llm.config.hidden_size), llm, 4, select_layer=5)


def test_loss_equals_full_logits_loss_on_labelled_tokens(tokenizer):
    model, proc = make(tokenizer)
    batch = batch_of(proc)
    loss = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "labels")})["loss"]
    logits = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])["logits"]
    ref = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]),
        batch["labels"][:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
    )
    assert torch.allclose(loss, ref, atol=1e-5)


def test_qtype_weights_weigh_each_reply_by_its_question_type(tokenizer):
    model, proc = make(tokenizer)
    proc.qtype_weights = {"exists": 4.0}
    sample = {"image": Image.new("RGB", (64, 64), "red"), "conversations": CONV}
    sample["meta"] = {"qtypes": ["color", "exists"]}
    item = proc.encode(sample)
    w, labels = item["loss_weights"], item["labels"]
    assert ((w > 0) == (labels != IGNORE_INDEX)).all()  # weights sit exactly on the targets
    replies = (labels != IGNORE_INDEX).int()
    starts = (replies[1:] - replies[:-1] == 1).nonzero().squeeze(1) + 1  # first token of each reply
    assert w[starts].tolist() == [1.0, 4.0]
    batch = proc.collate([item, proc.encode({**sample, "meta": {"qtype": "color"}})])
    assert batch["loss_weights"][1].max() == 1.0 and batch["loss_weights"].shape == batch["labels"].shape
    args = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "labels")}
    loss = model(**args, loss_weights=batch["loss_weights"])["loss"]
    logits = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])["logits"]
    ce = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], ignore_index=IGNORE_INDEX, reduction="none"
    )
    weights = batch["loss_weights"][:, 1:]
    torch.testing.assert_close(loss, (ce * weights).sum() / weights.sum())


def test_generate_greedy_matches_manual_argmax_decoding(tokenizer):
    """KV-cached generation reproduces step-by-step argmax over full re-computation."""
    model, proc = make(tokenizer)
    model.eval()
    batch = batch_of(proc, n=1, prompts=True)
    out = model.generate(
        batch["input_ids"],
        batch["attention_mask"],
        batch["pixel_values"],
        max_new_tokens=4,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    ids = batch["input_ids"]
    for _ in range(4):
        mask = torch.ones_like(ids)
        nxt = model(ids, mask, batch["pixel_values"])["logits"][:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], 1)
    assert out.tolist() == ids[:, batch["input_ids"].shape[1] :].tolist()


@pytest.mark.parametrize("mode", [dict(num_beams=3), dict(do_sample=True, temperature=0.7, top_p=0.9)])
def test_generate_batched_beam_and_sampling(tokenizer, mode):
    model, proc = make(tokenizer)
    batch = batch_of(proc, n=3, prompts=True)
    out = model.generate(
        batch["input_ids"],
        batch["attention_mask"],
        batch["pixel_values"],
        max_new_tokens=3,
        pad_token_id=0,
        **mode,
    )
    assert out.shape[0] == 3 and 1 <= out.shape[1] <= 3


def test_frozen_parts_stay_bit_identical_and_trained_parts_get_gradients(tokenizer):
    model, proc = make(tokenizer)
    apply_tune(model.vision_tower, PartTune("frozen"), model.vision_tower.blocks, "vision_tower")
    apply_tune(model.connector, PartTune("full"), None, "connector")
    apply_tune(model.llm, PartTune("partial", k=1, side="last"), decoder_layers(model.llm), "llm")
    model.train()
    assert not model.vision_tower.training, "a frozen tower stays in eval mode"
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = batch_of(proc)
    for _ in range(2):
        loss = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["labels"])[
            "loss"
        ]
        opt.zero_grad()
        loss.backward()
        for n, p in model.named_parameters():
            if p.requires_grad:
                assert p.grad is not None and p.grad.abs().sum() > 0, n
        opt.step()
    after = model.state_dict()
    last = len(decoder_layers(model.llm)) - 1
    for k, v in before.items():
        trained = k.startswith(("connector.", f"llm.model.layers.{last}."))
        assert torch.equal(v, after[k]) != trained, k


def test_a_frozen_part_is_in_eval_mode_once_the_module_is_built(tokenizer):
    """Lightning keeps the modes it finds when fitting starts: the recipe must set them."""
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["stage=pretrain"])
    model = build_module(cfg, tokenizer).model
    assert not model.vision_tower.training and not model.llm.training
    assert model.connector.training


def test_lora_trains_only_adapters_and_keeps_base_output_at_init(tokenizer):
    model, proc = make(tokenizer)
    batch = batch_of(proc)
    ref = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])["logits"]
    apply_tune(model.llm, PartTune("lora", lora_r=4), decoder_layers(model.llm), "llm")
    trainable = [n for n, p in model.llm.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert not any("lm_head" in n or "embed_tokens" in n for n in trainable)
    out = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])["logits"]
    assert torch.allclose(out, ref, atol=1e-6), "LoRA B is zero-initialised"


def test_a_pooling_connector_averages_grid_neighbourhoods_before_its_mlp():
    """pool=2 on a 4 x 4 grid: token (r, c) of the 2 x 2 output is the mean of patches
    (2r..2r+1, 2c..2c+1), then the MLP; a grid it cannot tile is refused in one line."""
    torch.manual_seed(0)
    conn = Connector(8, 16, pool=2)
    x = torch.randn(2, 16, 8)
    grid = x.view(2, 4, 4, 8)
    want = torch.stack(
        [grid[:, 2 * r : 2 * r + 2, 2 * c : 2 * c + 2].mean((1, 2)) for r in range(2) for c in range(2)], 1
    )
    assert conn.num_tokens(16) == 4
    torch.testing.assert_close(conn(x), conn.proj(want))
    assert Connector(8, 16).num_tokens(16) == 16
    with pytest.raises(
        ValueError, match=r"^connector pool=2 needs a square grid whose side it divides, got 9 tokens$"
    ):
        conn.num_tokens(9)

"""``image_positions``: position ids of image spans among text under any padding, M-RoPE on an
unforked HF LLM, 2-D embeddings on the connector's output, and KV-cached decoding that sees
exactly the positions of a full forward pass in every mode."""

import pytest
import torch
from PIL import Image
from runs import data_overrides, encode_batch, load_ckpt, one_thread, run_train, steps

from vlm.cli.load import load_for
from vlm.core.connectors import Connector
from vlm.core.llava import LlavaModel
from vlm.core.positions import ImageLayout, Piece, build_image_positions
from vlm.core.positions.ids import position_ids
from vlm.core.positions.mrope import MultimodalRotaryEmbedding, install_mrope
from vlm.core.processor import VLMProcessor, image_transform
from vlm.core.templates import build_template
from vlm.core.tokenizer import IMAGE_TOKEN, train_tokenizer
from vlm.core.zoo.encoders import build_vision_tower
from vlm.core.zoo.llms import build_llm
from vlm.families.dense_connector.connectors import DenseConnector
from vlm.runtime.errors import ConfigError

T, I, P = 5, 9, 0  # text, image and pad token ids  # noqa: E741
GRID = ImageLayout((Piece(2, 3),))  # 2 rows x 3 columns = 6 image tokens
MROPE = GRID.mrope_offsets()


def ids_and_mask(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor(rows)
    return ids, (ids != P).long()


def positions(rows, offsets_extent=MROPE):
    ids, mask = ids_and_mask(rows)
    return position_ids(ids, mask, I, *offsets_extent)


# --- position ids -----------------------------------------------------------------------------------

IMG = [I] * 6
# (t, h, w) of a 2 x 3 grid starting at s: t = s; h = s + row; w = s + column
GRID_AT_2 = [[2] * 6, [2, 2, 2, 3, 3, 3], [2, 3, 4, 2, 3, 4]]


def test_an_image_grid_inside_text_takes_t_h_w_positions_and_text_resumes_past_its_largest():
    got = positions([[T, T, *IMG, T, T, P, P], [P, P, T, T, *IMG, T, T]])  # right and left padding
    expected_valid = [[0, 1, *GRID_AT_2[r], 5, 6] for r in range(3)]
    assert got[:, 0, :10].tolist() == expected_valid
    assert got[:, 1, 2:].tolist() == expected_valid  # left padding shifts nothing
    assert got[:, 0, 10:].eq(0).all() and got[:, 1, :2].eq(0).all()


def test_flat_positions_count_every_valid_token_under_left_and_right_padding():
    flat = (torch.zeros(1, 1, dtype=torch.long), 1)
    got = positions([[T, *IMG, T, P], [P, T, *IMG, T]], flat)
    assert got[0, 0].tolist() == [*range(8), 0]
    assert got[0, 1].tolist() == [0, *range(8)]


def test_two_images_each_take_their_own_grid_whether_text_separates_them_or_not():
    apart = positions([[T, *IMG, T, *IMG, T]])[:, 0]
    assert apart[:, 0].tolist() == [0, 0, 0]
    assert apart[:, 1:7].tolist() == [[1] * 6, [1, 1, 1, 2, 2, 2], [1, 2, 3, 1, 2, 3]]
    assert apart[:, 7].tolist() == [4, 4, 4]  # 1 + max(2, 3)
    assert apart[:, 8:14].tolist() == [[5] * 6, [5, 5, 5, 6, 6, 6], [5, 6, 7, 5, 6, 7]]
    assert apart[:, 14].tolist() == [8, 8, 8]
    together = positions([[T, *IMG, *IMG, T]])[:, 0]
    assert together[:, 7:13].tolist() == [[4] * 6, [4, 4, 4, 5, 5, 5], [4, 5, 6, 4, 5, 6]]
    assert together[:, 13].tolist() == [7, 7, 7]


def test_a_token_count_that_is_no_whole_number_of_images_is_refused():
    with pytest.raises(ValueError, match="7 image tokens, not a multiple of the image span"):
        positions([[T, *IMG, I, T]])


def test_layouts_put_prefix_tokens_and_pooled_runs_on_one_position_each():
    layout = ImageLayout((Piece(1), Piece(2, 2), Piece(2)))  # CLS, a 2 x 2 grid, 2 pooled tokens
    offsets, extent = layout.mrope_offsets()
    assert offsets.tolist() == [[0, 1, 1, 1, 1, 3, 4], [0, 1, 1, 2, 2, 3, 4], [0, 1, 2, 1, 2, 3, 4]]
    assert extent == 5
    y, x, on_grid = ImageLayout((Piece(4, 4), Piece(2, 2))).coordinates()
    assert (
        on_grid.all() and y[16:].tolist() == [0.5, 0.5, 2.5, 2.5] and x[16:].tolist() == [0.5, 2.5, 0.5, 2.5]
    )
    assert Connector(8, 8, pool=2).token_layout(4) == (Piece(2, 2),)
    sti = DenseConnector(8, 8, "sti", tower_depth=12, stride=8)
    assert sti.token_layout(4) == (Piece(4, 4), Piece(2), Piece(2))
    assert ImageLayout(sti.token_layout(4)).length == sti.num_tokens(16)


# --- M-RoPE on the LLM ---------------------------------------------------------------------------------


def test_mrope_with_equal_sections_is_plain_rope_on_text_bit_for_bit():
    torch.manual_seed(0)
    kw = dict(hidden_size=96, num_attention_heads=2, num_key_value_heads=2)  # head_dim 48: 24 pairs
    llm = build_llm("tiny_llama", vocab_size=50, **kw).eval()
    ids = torch.randint(1, 50, (2, 12))
    flat = torch.arange(12).expand(2, -1)
    with torch.no_grad():
        plain = llm(ids, position_ids=flat).logits
        install_mrope(llm, [8, 8, 8])
        assert isinstance(llm.model.rotary_emb, MultimodalRotaryEmbedding)
        three = llm(ids, position_ids=flat.expand(3, -1, -1)).logits
        two = llm(ids, position_ids=flat).logits
    assert torch.equal(plain, three) and torch.equal(plain, two)
    assert llm.state_dict().keys() == build_llm("tiny_llama", vocab_size=50, **kw).state_dict().keys()


def test_mrope_rotates_by_height_and_width_in_their_own_sections():
    llm = build_llm("tiny_qwen3", vocab_size=50)
    install_mrope(llm, None)
    rope = llm.model.rotary_emb
    t, h, w = rope.sections
    pos = torch.tensor([[[3]], [[5]], [[11]]])  # t, h, w of one token
    cos, _ = rope(torch.zeros(1), pos)
    inv = rope.rope.inv_freq
    angles = torch.cat([3 * inv[:t], 5 * inv[t : t + h], 11 * inv[t + h :]])
    torch.testing.assert_close(cos[0, 0], torch.cat([angles, angles]).cos())


def test_mrope_on_an_llm_without_rotary_positions_is_one_clear_line():
    with pytest.raises(ValueError, match="image_positions=mrope needs a rotary LLM .* llm is gpt2"):
        install_mrope(build_llm("tiny_gpt2", vocab_size=50), None)
    with pytest.raises(ValueError, match=r"sum to head_dim/2 = 8"):
        install_mrope(build_llm("tiny_llama", vocab_size=50), [2, 2, 2])
    with pytest.raises(ValueError, match="choose from flat, mrope, sincos2d, learned2d"):
        build_image_positions({"name": "rope2d"}, GRID, None, I)
    with pytest.raises(ValueError, match="needs image tokens on a 2-D grid"):
        build_image_positions({"name": "learned2d"}, None, None, I)


# --- the model in every mode ---------------------------------------------------------------------------

QUESTIONS = ["What color is the circle?", "Is there a square?", "What color is the square and the circle?"]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer([*QUESTIONS, "red", "no", "blue"] * 4, vocab_size=200)


def model_for(tokenizer, mode: dict | None, seed: int = 0):
    torch.manual_seed(seed)
    tower = build_vision_tower("tiny_clip")
    llm = build_llm("tiny_llama", vocab_size=len(tokenizer))
    conn = Connector(tower.hidden_size, llm.config.hidden_size)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    model = LlavaModel(tower, conn, llm, image_id, image_positions=mode)
    template = build_template("auto", tokenizer)
    proc = VLMProcessor(tokenizer, template, {"v": image_transform(tower.image_spec)}, model.num_image_tokens)
    return model.eval(), proc


def turns(question: str) -> list[dict]:
    return [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": "red"}]


def prompts(proc, n=3):
    """Prompts of different lengths, so the batch is left-padded."""
    samples = [
        {"image": Image.new("RGB", (64, 64), c), "conversations": turns(q)}
        for c, q in zip(["red", "blue", "green"][:n], QUESTIONS, strict=False)
    ]
    return encode_batch(proc, samples, prompts=True)


MODES = [
    None,
    {"name": "mrope", "sections": None},
    {"name": "sincos2d", "init_scale": 0.5},
    {"name": "learned2d", "std": 0.5},
]


@pytest.mark.parametrize("mode", MODES, ids=["flat", "mrope", "sincos2d", "learned2d"])
def test_kv_cached_generation_gives_the_logits_of_full_forward_passes(tokenizer, mode):
    model, proc = model_for(tokenizer, mode)
    if model.image_positions.added is not None:
        model.image_positions.added.scale.data.fill_(0.5)  # learned2d starts at 0: make it act
    batch = prompts(proc)
    assert (batch["attention_mask"][:, 0] == 0).any()  # left padding present
    args = (batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
    out = model.generate(
        *args, max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0,
        return_dict_in_generate=True, output_logits=True,
    )  # fmt: skip
    ids, mask = args[0], args[1]
    with torch.no_grad():
        for step, cached in enumerate(out.logits):
            full = model(ids, mask, args[2])["logits"][:, -1]
            torch.testing.assert_close(cached, full, rtol=1e-4, atol=1e-5, msg=f"step {step}")
            ids = torch.cat([ids, out.sequences[:, step : step + 1]], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)


def test_the_modes_change_what_the_llm_sees_of_an_image_and_flat_is_the_default(tokenizer):
    batch = prompts(proc := model_for(tokenizer, None)[1])
    args = (batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
    logits = {}
    for mode in MODES:
        model, _ = model_for(tokenizer, mode)
        if model.image_positions.added is not None:
            model.image_positions.added.scale.data.fill_(0.5)
        with torch.no_grad():
            logits[(mode or {}).get("name", "flat")] = model(*args)["logits"]
    assert model_for(tokenizer, None)[0].image_positions.name == "flat" and proc
    for name in ("mrope", "sincos2d", "learned2d"):
        assert not torch.allclose(logits[name], logits["flat"], atol=1e-4), name


def test_learned2d_at_zero_init_is_the_flat_model_and_its_scale_gets_a_gradient(tokenizer):
    flat, proc = model_for(tokenizer, None)
    learned, _ = model_for(tokenizer, {"name": "learned2d"})
    assert learned.image_positions.added.scale.item() == 0.0
    batch = encode_batch(
        proc, [{"image": Image.new("RGB", (64, 64), "red"), "conversations": turns(QUESTIONS[0])}]
    )
    args = (batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
    with torch.no_grad():
        assert torch.equal(flat(*args)["logits"], learned(*args)["logits"])
    loss = learned(*args, labels=batch["labels"])["loss"]
    loss.backward()
    added = learned.image_positions.added
    assert added.scale.grad.abs() > 0 and added.rows.grad.abs().sum() == 0  # the tables wait for the scale
    assert "image_positions" in learned.parts() and "image_positions" not in flat.parts()
    assert learned.resolve_tune({"connector": {"type": "full"}})["image_positions"] == {"type": "full"}


# --- through vlm-train: the group, the recipe and the checkpoint -----------------------------------------


def test_a_run_trains_its_positions_and_its_checkpoint_rebuilds_the_same_mode(shapesworld, tmp_path):
    with one_thread():
        run_train(
            [*data_overrides(shapesworld), *steps(3, 3), "test=false", "image_positions=learned2d"], tmp_path
        )
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    assert load_ckpt(ckpt)["hyper_parameters"]["model"]["image_positions"]["name"] == "learned2d"
    module = load_for("test", ckpt, "cpu")
    added = module.model.image_positions.added
    assert (
        module.model.image_positions.name == "learned2d" and added.scale.item() != 0.0
    )  # trained with the connector
    assert torch.equal(added.rows, load_ckpt(ckpt)["state_dict"]["model.image_positions.added.rows"])


def test_a_family_that_places_image_tokens_itself_refuses_another_mode(shapesworld, tmp_path):
    overrides = [
        *data_overrides(shapesworld),
        *steps(1, 1),
        "family=sam_segmentation",
        "image_positions=mrope",
    ]
    with pytest.raises(
        ConfigError, match="image_positions=mrope: this family's model places image tokens itself"
    ):
        run_train(overrides, tmp_path)

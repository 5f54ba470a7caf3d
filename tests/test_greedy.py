"""``LlavaModel.generate``'s greedy loop gives transformers' ``generate`` tokens: left-padded
prompts, flat and M-RoPE positions, dynamic and static caches, rows that end on EOS early and
EOS suppressed by ``min_new_tokens``; any other call is left to ``generate``."""

import pytest
import torch
from PIL import Image

from vlm.core.connectors import Connector
from vlm.core.greedy import is_plain_greedy
from vlm.core.llava import LlavaModel
from vlm.core.processor import VLMProcessor, image_transform
from vlm.core.templates import build_template
from vlm.core.tokenizer import IMAGE_TOKEN, train_tokenizer
from vlm.core.zoo.encoders import build_vision_tower
from vlm.core.zoo.llms import build_llm

WORDS = "what colour is the shape a red circle left of a blue square yes no how many"


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer([WORDS] * 8, vocab_size=120)


def model_and_prompts(tokenizer, positions: dict | None):
    torch.manual_seed(0)
    tower = build_vision_tower("tiny_clip")
    llm = build_llm("tiny_llama", vocab_size=len(tokenizer))
    with torch.no_grad():
        for p in llm.parameters():
            p.mul_(3.0)  # wider than init: varied tokens, far from ties
    conn = Connector(tower.hidden_size, llm.config.hidden_size)
    model = LlavaModel(
        tower, conn, llm, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), image_positions=positions
    )
    proc = VLMProcessor(
        tokenizer,
        build_template("auto", tokenizer),
        {"v": image_transform(tower.image_spec)},
        model.num_image_tokens,
    )
    questions = ["what colour", "how many red circle left of a blue square", "is the shape"]
    samples = [
        {
            "image": Image.new("RGB", (64, 64), c),
            "conversations": [
                {"from": "human", "value": f"{IMAGE_TOKEN}\n{q}"},
                {"from": "gpt", "value": ""},
            ],
        }
        for c, q in zip(("red", "blue", "green"), questions, strict=True)
    ]
    batch = proc.collate_prompts([proc.encode_prompt(s) for s in samples])
    assert (batch["attention_mask"][:, 0] == 0).any()  # left padding present
    return model.eval(), {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}


def transformers_generate(model: LlavaModel, prompts: dict, **kwargs) -> torch.Tensor:
    embeds = model.embed_inputs(prompts["input_ids"], prompts["pixel_values"])
    positions = model.image_positions.position_ids(prompts["input_ids"], prompts["attention_mask"])
    with torch.no_grad():
        return model.llm.generate(
            inputs_embeds=embeds, attention_mask=prompts["attention_mask"], position_ids=positions, **kwargs
        )


@pytest.mark.parametrize("cache", [None, "static"])
@pytest.mark.parametrize("positions", [None, {"name": "mrope", "sections": None}], ids=["flat", "mrope"])
def test_greedy_gives_the_tokens_of_transformers_generate(tokenizer, positions, cache):
    model, prompts = model_and_prompts(tokenizer, positions)
    base = dict(max_new_tokens=12, do_sample=False, num_beams=1, pad_token_id=0, cache_implementation=cache)
    first = model.generate(**prompts, **base, eos_token_id=tokenizer.eos_token_id, min_new_tokens=12)
    ends = [int(first[0, 2]), int(first[1, 4])]  # EOS ids some rows do produce: they end early
    for eos in (dict(eos_token_id=tokenizer.eos_token_id, min_new_tokens=12), dict(eos_token_id=ends)):
        kwargs = base | eos
        assert is_plain_greedy(model.llm, kwargs)
        ours = model.generate(**prompts, **kwargs)
        assert ours.tolist() == transformers_generate(model, prompts, **kwargs).tolist()
    assert (ours == 0).any()  # a row ended and was padded


def test_other_calls_are_left_to_generate(tokenizer):
    model, _ = model_and_prompts(tokenizer, None)
    plain = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=3)
    assert is_plain_greedy(model.llm, plain)
    for other in (dict(do_sample=True), dict(num_beams=2), dict(eos_token_id=None), dict(output_scores=True)):
        assert not is_plain_greedy(model.llm, plain | other)
    model.llm.generation_config.repetition_penalty = 1.2
    assert not is_plain_greedy(model.llm, plain)

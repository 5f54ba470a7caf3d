"""Label masking, token by token: labels are -100 everywhere except assistant replies and
their end token, for every template kind; truncation never cuts the image span."""

import pytest
import torch
from PIL import Image

from vlm.core.processor import VLMProcessor
from vlm.core.templates import ChatTemplate, build_template
from vlm.core.tokenizer import IGNORE_INDEX, IMAGE_TOKEN, train_tokenizer
from vlm.data.datasets import SkipSample

CONV = [
    {"from": "human", "value": "<image>\nWhat color is the circle?"},
    {"from": "gpt", "value": "red"},
    {"from": "human", "value": "How many shapes are there?"},
    {"from": "gpt", "value": "three shapes"},
]
# A Llama-3-style template: headers and end-of-turn tokens that differ from the EOS token.
LLAMA3_STYLE = (
    "{{ bos_token }}{% for m in messages %}<|start|>{{ m['role'] }}<|end_header|>\n\n"
    "{{ m['content'] }}<|eot|>{% endfor %}{% if add_generation_prompt %}"
    "<|start|>assistant<|end_header|>\n\n{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer():
    tok = train_tokenizer([t["value"] for t in CONV] * 5, vocab_size=300)
    tok.add_special_tokens({"extra_special_tokens": [IMAGE_TOKEN, "<|start|>", "<|end_header|>", "<|eot|>"]})
    return tok


def make_processor(tokenizer, template, max_length=512, num_image_tokens=6):
    return VLMProcessor(
        tokenizer, template, {"vision": lambda im: torch.zeros(3, 8, 8)}, num_image_tokens, max_length
    )


def labelled_spans(labels):
    """Contiguous runs of positions whose label is not IGNORE_INDEX."""
    spans, start = [], None
    for i, lab in enumerate([*labels.tolist(), IGNORE_INDEX]):
        if lab != IGNORE_INDEX and start is None:
            start = i
        if lab == IGNORE_INDEX and start is not None:
            spans.append((start, i))
            start = None
    return spans


@pytest.mark.parametrize("kind", ["auto", "vicuna_v1", "raw", "llama3_style"])
def test_labels_cover_exactly_the_replies_and_their_end_token(tokenizer, kind):
    if kind == "llama3_style":
        template = ChatTemplate(tokenizer, LLAMA3_STYLE)
        end = "<|eot|>"
    else:
        template = build_template(kind, tokenizer)
        end = tokenizer.eos_token
    proc = make_processor(tokenizer, template)
    item = proc.encode({"image": Image.new("RGB", (8, 8)), "conversations": CONV})
    ids, labels = item["input_ids"], item["labels"]
    spans = labelled_spans(labels)
    assert len(spans) == 2, "one labelled span per assistant reply"
    for (a, b), reply in zip(spans, ["red", "three shapes"], strict=True):
        assert torch.equal(labels[a:b], ids[a:b])
        assert tokenizer.decode(ids[a:b]).replace(" ", "") == (reply + end).replace(" ", "")
        assert tokenizer.convert_ids_to_tokens(int(ids[b - 1])) == end
        # the token just before the reply is the assistant header, not part of the target
        assert labels[a - 1] == IGNORE_INDEX
    n_img = int((ids == proc.image_token_id).sum())
    assert n_img == 6 and (labels[ids == proc.image_token_id] == IGNORE_INDEX).all()


def test_plain_template_targets_only_the_caption(tokenizer):
    proc = make_processor(tokenizer, build_template("plain", tokenizer))
    conv = [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "a red circle"}]
    item = proc.encode({"image": Image.new("RGB", (8, 8)), "conversations": conv})
    ids, labels = item["input_ids"], item["labels"]
    ((a, b),) = labelled_spans(labels)
    assert tokenizer.decode(ids[a:b], skip_special_tokens=True).strip() == "a red circle"
    assert int(ids[b - 1]) == tokenizer.eos_token_id and b == len(ids)
    assert "Describe" not in tokenizer.decode(ids)
    assert int(ids[0]) == tokenizer.bos_token_id and int(ids[1]) == proc.image_token_id


def test_raw_template_keeps_the_question_and_has_no_roles(tokenizer):
    """``raw`` (``template=plain`` of the dense_connector family): unlike LLaVA's ``plain``
    the question reaches the model, as text, with no role words."""
    proc = make_processor(tokenizer, build_template("raw", tokenizer))
    item = proc.encode({"image": Image.new("RGB", (8, 8)), "conversations": CONV})
    text = tokenizer.decode(item["input_ids"])
    assert "color is the circle" in text.replace("  ", " ") and "many shapes" in text
    assert "USER" not in text and "ASSISTANT" not in text


@pytest.mark.parametrize("kind", ["auto", "raw"])
def test_generation_prompt_matches_training_prefix(tokenizer, kind):
    """The prompt at inference is token-for-token the prefix the model saw in training."""
    proc = make_processor(tokenizer, build_template(kind, tokenizer))
    sample = {"image": Image.new("RGB", (8, 8)), "conversations": CONV[:2]}
    train = proc.encode(sample)
    gen = proc.encode_prompt(sample)
    n = len(gen["input_ids"])
    assert torch.equal(train["input_ids"][:n], gen["input_ids"])
    assert (train["labels"][:n] == IGNORE_INDEX).all() and train["labels"][n] != IGNORE_INDEX
    assert gen["answer"] == "red"


def test_truncation_never_cuts_the_image_span(tokenizer):
    template = build_template("auto", tokenizer)
    sample = {"image": Image.new("RGB", (8, 8)), "conversations": CONV}
    full = make_processor(tokenizer, template).encode(sample)["input_ids"]
    # room for the image span and part of the text: truncated, image span whole
    cut = make_processor(tokenizer, template, max_length=len(full) - 3).encode(sample)
    assert len(cut["input_ids"]) == len(full) - 3
    # the image span ends past max_length: the sample is dropped and counted, not cut
    proc = make_processor(tokenizer, template, max_length=4, num_image_tokens=6)
    with pytest.raises(SkipSample, match="longer than max_length: the image span ends past max_length=4"):
        proc.encode(sample)


def test_collate_pads_right_for_training_and_left_for_generation(tokenizer):
    proc = make_processor(tokenizer, build_template("auto", tokenizer))
    short = {"image": Image.new("RGB", (8, 8)), "conversations": CONV[:2]}
    items = [proc.encode(short), proc.encode({"image": Image.new("RGB", (8, 8)), "conversations": CONV})]
    batch = proc.collate(items)
    n0 = len(items[0]["input_ids"])
    assert (batch["input_ids"][0, n0:] == tokenizer.pad_token_id).all()
    assert (batch["labels"][0, n0:] == IGNORE_INDEX).all()
    assert batch["attention_mask"][0].tolist() == [1] * n0 + [0] * (batch["input_ids"].shape[1] - n0)
    long = {**short, "conversations": CONV}
    gen = proc.collate_prompts([proc.encode_prompt(short), proc.encode_prompt(long)])
    g0 = int(gen["attention_mask"][0].sum())
    assert gen["attention_mask"][0, -g0:].all() and not gen["attention_mask"][0, :-g0].any()
    assert batch["pixel_values"].shape == (2, 3, 8, 8)


def test_the_text_cache_returns_what_processing_returns_and_stays_within_its_size(tokenizer, monkeypatch):
    image = Image.new("RGB", (8, 8))
    other = [
        {"from": "human", "value": "<image>\nHow many shapes are there?"},
        {"from": "gpt", "value": "two"},
    ]
    samples = [{"conversations": c, "image": image} for c in (CONV, other)]
    plain = make_processor(tokenizer, build_template("auto", tokenizer))
    cached = make_processor(tokenizer, build_template("auto", tokenizer))
    cached.cache_text(1)
    renders = []
    segments = cached.template.segments
    monkeypatch.setattr(cached.template, "segments", lambda *a, **k: renders.append(1) or segments(*a, **k))
    for _ in range(3):  # three epochs
        for sample in samples:
            for mode in ("encode", "encode_prompt"):
                want, got = getattr(plain, mode)(sample), getattr(cached, mode)(sample)
                assert want.keys() == got.keys()
                for key in ("input_ids", "labels", "pixel_values"):
                    if key in want:
                        assert torch.equal(want[key], got[key]), (mode, key)
    assert len(cached._text_cache) == 1  # the first conversation's training text
    assert len(renders) == 1 + 3 * 3  # rendered once when cached, every time otherwise


def test_pretokenize_fills_the_cache_in_worker_processes_with_what_encoding_gives(tokenizer, monkeypatch):
    image = Image.new("RGB", (8, 8))
    short = CONV[:2]
    samples = [
        {"conversations": CONV, "meta": {"qtypes": ["color", "count"]}},
        {"conversations": short, "meta": {"qtype": "color"}},
        {"conversations": [{"from": "robot", "value": "?"}, {"from": "gpt", "value": "x"}], "meta": {}},
    ]
    plain = make_processor(tokenizer, build_template("auto", tokenizer))
    pre = make_processor(tokenizer, build_template("auto", tokenizer))
    for proc in (plain, pre):
        proc.qtype_weights = {"count": 3.0}
    pre.cache_text(10)
    assert pre.pretokenize(samples, processes=2) == 2  # the malformed one is left to the loader
    monkeypatch.setattr(pre.template, "segments", lambda *a, **k: pytest.fail("rendered after pretokenize"))
    for sample in samples[:2]:
        want, got = plain.encode({**sample, "image": image}), pre.encode({**sample, "image": image})
        for key in ("input_ids", "labels", "loss_weights"):
            assert torch.equal(want[key], got[key]), key
    assert 3.0 in pre.encode({**samples[0], "image": image})["loss_weights"].tolist()
    full = make_processor(tokenizer, build_template("auto", tokenizer))
    full.cache_text(1)
    assert full.pretokenize(samples, processes=2) == 1  # no more than the cache holds

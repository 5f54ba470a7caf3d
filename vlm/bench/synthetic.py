"""Synthetic batches of a configured shape, so real-size configs are benchmarked with no data
on disk.

A sample is a conversation of random words about a noise image, rendered by the family's own
processor: its template, its label masking and its image transforms (one tensor or CALM's
dict per tower). Conversations are grown turn by turn until the text passes ``text_len`` and
the processor truncates them, as it does in training, to exactly ``image tokens + text_len``.
Each sample also carries one square target mask, which only a segmentation family reads.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from vlm.core.processor import VLMProcessor
from vlm.core.tokenizer import IMAGE_TOKEN
from vlm.data.datasets import SkipSample

WORDS = (
    "the a is are there of to left right above below next big small red green blue yellow purple "
    "orange grey white black square circle triangle cross star ellipse shape colour how many what "
    "which where one two three four five yes no image picture scene shows describe"
).split()
QUESTION_WORDS = (6, 16)  # LLaVA-style turns: short questions, longer answers
ANSWER_WORDS = (12, 48)


def _words(rng: np.random.Generator, span: tuple[int, int]) -> str:
    return " ".join(rng.choice(WORDS, size=int(rng.integers(*span))))


def _turn_pair(rng: np.random.Generator, first: bool) -> list[dict]:
    question = _words(rng, QUESTION_WORDS) + "?"
    return [
        {"from": "human", "value": f"{IMAGE_TOKEN}\n{question}" if first else question},
        {"from": "gpt", "value": _words(rng, ANSWER_WORDS) + "."},
    ]


def corpus(n: int = 256, seed: int = 0) -> list[str]:
    """Text to train the in-process tokenizer on, from the same words the samples use."""
    rng = np.random.default_rng(seed)
    return [t["value"].replace(IMAGE_TOKEN, "") for _ in range(n) for t in _turn_pair(rng, False)]


def _text_tokens(processor: VLMProcessor, turns: list[dict]) -> int:
    ids, _, _ = processor.encode_segments(processor.template.segments(turns))
    return len(ids) - processor.num_image_tokens


def long_conversation(processor: VLMProcessor, rng: np.random.Generator, text_len: int) -> list[dict]:
    """Turns whose rendering holds at least ``text_len`` text tokens. A template that reads
    only the first exchange (``plain``: image + caption) gets a longer first answer instead."""
    turns = _turn_pair(rng, first=True)
    length = _text_tokens(processor, turns)
    while length < text_len:
        grown = turns + _turn_pair(rng, first=False)
        grown_length = _text_tokens(processor, grown)
        if grown_length == length:
            turns[1]["value"] = turns[1]["value"][:-1] + " " + _words(rng, ANSWER_WORDS) + "."
            grown_length = _text_tokens(processor, turns)
        else:
            turns = grown
        length = grown_length
    return turns


IMAGE_SIZE = 256


def noise_image(rng: np.random.Generator, size: int = IMAGE_SIZE) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def square_mask(size: int = IMAGE_SIZE) -> dict:
    """``meta`` of a record with one target: the middle half of the image, as a COCO polygon."""
    lo, hi = size // 4, 3 * size // 4
    return {"height": size, "width": size, "masks": [[[lo, lo, hi, lo, hi, hi, lo, hi]]]}


def synthetic_batches(
    processor: VLMProcessor, batch_size: int, text_len: int, seed: int = 0
) -> tuple[dict, dict]:
    """A training batch (B, num_image_tokens + text_len), no padding, and a generation batch
    of the same samples' first question (left-padded prompts, as ``vlm-predict`` builds them)."""
    rng = np.random.default_rng(seed)
    processor.max_length = processor.num_image_tokens + text_len
    train, prompts = [], []
    for i in range(batch_size):
        image = noise_image(rng)
        turns = long_conversation(processor, rng, text_len)
        try:
            sample = {"id": str(i), "image": image, "meta": square_mask()}
            train.append(processor.encode(sample | {"conversations": turns}))
            prompts.append(processor.encode_prompt(sample | {"conversations": turns[:2]}))
        except SkipSample as err:
            raise ValueError(
                f"bench.text_len={text_len} leaves no answer token after the first question: raise it ({err})"
            ) from None
    return processor.collate(train), processor.collate_prompts(prompts)

"""Turn a sample (image + LLaVA conversation) into model tensors, and batches of them.

The ``<image>`` placeholder is expanded here into ``num_image_tokens`` image-token ids, so
the sequence length the model sees is known before the forward pass: truncation can refuse
to cut the image span, and the model only has to scatter features into marked positions.
"""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor

import torch
from PIL import Image
from torchvision.transforms import v2

from vlm.core.templates import Template
from vlm.core.tokenizer import IGNORE_INDEX, IMAGE_TOKEN
from vlm.core.zoo.registry import ImageSpec
from vlm.data.datasets import SkipSample

ImageTransform = Callable[[Image.Image], torch.Tensor]


def image_transform(spec: ImageSpec) -> ImageTransform:
    """Resize the shorter side, centre-crop, scale to [0, 1], normalise with the encoder's stats."""
    return v2.Compose(
        [
            v2.PILToTensor(),
            v2.Resize(spec.size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop(spec.size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(spec.mean, spec.std),
        ]
    )


class VLMProcessor:
    """Tokenises with segment-level label masks and applies each tower's preprocessing.

    ``image_transforms`` maps a tower name to its transform; with one tower ``pixel_values``
    is a tensor, with several (CALM's anchor + augmenting) a dict of tensors.
    """

    def __init__(
        self,
        tokenizer,
        template: Template,
        image_transforms: dict[str, ImageTransform],
        num_image_tokens: int,
        max_length: int = 512,
        qtype_weights: dict[str, float] | None = None,
    ):
        self.tokenizer = tokenizer
        self.qtype_weights = dict(qtype_weights or {})
        self.template = template
        self.image_transforms = image_transforms
        self.num_image_tokens = num_image_tokens
        self.max_length = max_length
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.pad_token_id = tokenizer.pad_token_id
        self.text_cache_size = 0
        self._text_cache: dict[tuple, tuple[list[int], list[int], list[float]]] = {}

    def cache_text(self, size: int) -> None:
        """Keep the token ids, labels and weights of up to ``size`` conversations, keyed by
        their text: rendering the chat template and tokenising cost more than a tiny model's
        step, and every epoch after the first repeats them. Pixels are never cached (no
        memory for real images, and random augmentations stay random)."""
        self.text_cache_size = size

    def pretokenize(self, samples: Iterable[dict], processes: int) -> int:
        """Fill the text cache with the training text of ``samples`` before the first step, in
        ``processes`` forked workers: the chat template's rendering and the tokenizer then run
        in parallel once, instead of inside every step of the first epoch. A sample that fails
        here is left to the loader, which skips or raises as configured. Returns how many were
        cached."""
        jobs = []
        for s in samples:
            if len(jobs) >= self.text_cache_size - len(self._text_cache):
                break
            turns = s["conversations"]
            jobs.append((turns, self.reply_weights(s, len(turns) // 2)))
        if not jobs:
            return 0
        global _PRETOKENIZING
        _PRETOKENIZING = self
        try:
            # shut down by sentinels, not SIGTERM (a Trainer's SIGTERM handler lives on in a fork)
            with ProcessPoolExecutor(processes, mp_context=mp.get_context("fork")) as pool:
                chunk = max(1, len(jobs) // (8 * processes))
                outs = list(pool.map(_encode_training_text, jobs, chunksize=chunk))
        finally:
            _PRETOKENIZING = None
        done = 0
        for (turns, weights), out in zip(jobs, outs, strict=True):
            if out is not None:
                self._text_cache[self._text_key(False, turns, weights)] = out
                done += 1
        return done

    def encode_segments(
        self, segments, reply_weights: list[float] | None = None
    ) -> tuple[list[int], list[int], list[float]]:
        """ids, labels and loss weights, segment by segment; ``<image>`` becomes the image-token
        span. A target token weighs its reply's entry of ``reply_weights`` (default 1), others 0."""
        ids: list[int] = []
        labels: list[int] = []
        weights: list[float] = []
        replies = iter(reply_weights or ())
        for seg in segments:
            w = next(replies, 1.0) if seg.target else 0.0
            start = len(ids)
            for j, piece in enumerate(seg.text.split(IMAGE_TOKEN)):
                if j > 0:
                    ids += [self.image_token_id] * self.num_image_tokens
                    labels += [IGNORE_INDEX] * self.num_image_tokens
                if piece:
                    piece_ids = self.tokenizer(piece, add_special_tokens=False)["input_ids"]
                    ids += piece_ids
                    labels += piece_ids if seg.target else [IGNORE_INDEX] * len(piece_ids)
            weights += [w if seg.target else 0.0] * (len(ids) - start)
        return ids, labels, weights

    def reply_weights(self, sample: dict, n_turns: int) -> list[float] | None:
        """Loss weight of each reply from its question type (``meta.qtypes``, one per reply,
        or ``meta.qtype``); None when no weights are configured."""
        if not self.qtype_weights:
            return None
        meta = sample.get("meta") or {}
        qtypes = meta.get("qtypes") or [meta.get("qtype")] * n_turns
        return [float(self.qtype_weights.get(q, 1.0)) for q in qtypes]

    def pixels(self, image: Image.Image | None):
        if image is None:
            return None
        out = {name: tf(image) for name, tf in self.image_transforms.items()}
        return next(iter(out.values())) if len(out) == 1 else out

    def encode(self, sample: dict) -> dict:
        """A training sample: ``input_ids``, ``labels`` (the replies only), ``pixel_values``
        and, with question-type weights, ``loss_weights``. ``SkipSample`` when it cannot be
        used (the data set skips and counts it, or raises, by its ``on_bad_sample``)."""
        return self._encode(sample, prompt=False)

    def encode_prompt(self, sample: dict) -> dict:
        """A prompt for generation: the conversation up to its last reply, which becomes the
        ``answer`` to score against (with ``meta`` and ``id``)."""
        return self._encode(sample, prompt=True)

    def encode_question(self, image: Image.Image | None, question: str, answer: str = "", **extra) -> dict:
        """A prompt asking ``question`` about ``image`` (what vlm-predict and the demo ask);
        ``answer`` is the reference to score against, ``extra`` the sample's other keys."""
        turns = [{"from": "human", "value": f"{IMAGE_TOKEN}\n{question}"}, {"from": "gpt", "value": answer}]
        return self.encode_prompt({"image": image, "conversations": turns, **extra})

    def _encode(self, sample: dict, prompt: bool) -> dict:
        turns = sample["conversations"]
        weights = None if prompt else self.reply_weights(sample, len(turns) // 2)
        ids, labels, token_weights = self.encode_text(turns, prompt, weights)
        if len(ids) > self.max_length:
            if prompt or self._image_end(ids) > self.max_length:
                what = "the prompt" if prompt else "the image span"
                raise SkipSample("longer than max_length", f"{what} ends past max_length={self.max_length}")
            ids, labels = ids[: self.max_length], labels[: self.max_length]
            token_weights = token_weights[: self.max_length]
        if not prompt and all(x == IGNORE_INDEX for x in labels):
            raise SkipSample("no target tokens left", f"every reply lies past max_length={self.max_length}")
        item = {"input_ids": torch.tensor(ids), "pixel_values": self.pixels(sample.get("image"))}
        if prompt:
            item.update(answer=turns[-1]["value"], meta=sample.get("meta", {}), id=sample.get("id"))
        else:
            item["labels"] = torch.tensor(labels)
            if weights is not None:
                item["loss_weights"] = torch.tensor(token_weights)
        return item

    def encode_text(self, turns: list[dict], prompt: bool, weights: list[float] | None):
        """``encode_segments`` of the conversation's template segments, through the cache."""
        key = self._text_key(prompt, turns, weights)
        hit = self._text_cache.get(key)
        if hit is not None:
            return hit
        if prompt:
            segments = self.template.segments(turns[:-1], add_generation_prompt=True)
        else:
            segments = self.template.segments(turns)
        out = self.encode_segments(segments, weights)
        if len(self._text_cache) < self.text_cache_size:
            self._text_cache[key] = out
        return out

    @staticmethod
    def _text_key(prompt: bool, turns: list[dict], weights: list[float] | None) -> tuple:
        return (prompt, tuple((t["from"], t["value"]) for t in turns), tuple(weights or ()))

    def _image_end(self, ids: list[int]) -> int:
        pos = [i for i, t in enumerate(ids) if t == self.image_token_id]
        return pos[-1] + 1 if pos else 0

    def collate(self, items: list[dict | None]) -> dict:
        """Training items, right-padded; dropped items (``None``) are left out."""
        return self._collate(items, left=False)

    def collate_prompts(self, items: list[dict | None]) -> dict:
        """Prompts, left-padded, so every prompt ends where decoding starts."""
        return self._collate(items, left=True)

    def _collate(self, items: list[dict | None], left: bool) -> dict:
        items = [it for it in items if it is not None]
        if not items:
            return {}
        width = max(len(it["input_ids"]) for it in items)
        batch: dict = {
            "input_ids": _pad([it["input_ids"] for it in items], width, self.pad_token_id, left),
        }
        lengths = torch.tensor([len(it["input_ids"]) for it in items])
        ar = torch.arange(width)
        batch["attention_mask"] = (
            ar[None] >= (width - lengths)[:, None] if left else ar[None] < lengths[:, None]
        ).long()
        if "labels" in items[0]:
            batch["labels"] = _pad([it["labels"] for it in items], width, IGNORE_INDEX, left)
        if "loss_weights" in items[0]:
            batch["loss_weights"] = _pad([it["loss_weights"] for it in items], width, 0.0, left)
        batch["pixel_values"] = _stack_pixels([it["pixel_values"] for it in items])
        for key in ("answer", "meta", "id"):
            if key in items[0]:
                batch[key] = [it[key] for it in items]
        return batch


_PRETOKENIZING: VLMProcessor | None = None  # the processor a forked pretokenize worker encodes with


def _encode_training_text(job: tuple[list[dict], list[float] | None]):
    turns, weights = job
    try:
        return _PRETOKENIZING.encode_text(turns, False, weights)
    except Exception:  # noqa: BLE001 - the loader meets this sample again and reports it
        return None


def _pad(seqs: list[torch.Tensor], width: int, value: float, left: bool) -> torch.Tensor:
    out = torch.full((len(seqs), width), value, dtype=seqs[0].dtype)
    for i, s in enumerate(seqs):
        if left:
            out[i, width - len(s) :] = s
        else:
            out[i, : len(s)] = s
    return out


def _stack_pixels(pixels: list):
    """Stack the images of the samples that have one (text-only samples carry no image)."""
    present = [p for p in pixels if p is not None]
    if not present:
        return None
    if isinstance(present[0], dict):
        return {k: torch.stack([p[k] for p in present]) for k in present[0]}
    return torch.stack(present)

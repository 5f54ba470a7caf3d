"""``lmms-eval --model vlm_lab --model_args ckpt=<path.ckpt>``: any vlm-lab checkpoint as an
lmms-eval "simple" model (``doc_to_visual`` + ``doc_to_text``). Each request becomes the prompt
our processor builds for one question about one image, ``<image>\\n<text>`` in the checkpoint's
own template, so lmms-eval scores what ``vlm-predict`` would answer."""

from __future__ import annotations

import os

import torch
from lightning.fabric.utilities import move_data_to_device
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from lmms_eval.utils import Collator
from PIL import Image
from tqdm import tqdm

import vlm.families  # noqa: F401  (registers every family's classes, which checkpoints name)
from vlm.core.lit_module import VLMLitModule
from vlm.core.tokenizer import IMAGE_TOKEN
from vlm.runtime.errors import ConfigError, said_in_one_line

MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values")
GENERATION_KEYS = ("max_new_tokens", "do_sample", "temperature", "top_p", "num_beams")


class VLMLab(lmms):
    """``batch_size`` comes from lmms-eval's ``--batch_size``, ``device`` from ``--device``
    (default: this process's GPU, ``LOCAL_RANK`` under a multi-process launch, else the CPU).
    lmms-eval itself splits the requests across ranks and sets ``rank`` / ``world_size``."""

    def __init__(
        self, ckpt: str | None = None, batch_size: int | str = 1, device: str | None = None, **unknown
    ) -> None:
        super().__init__()
        with said_in_one_line():
            if unknown:
                raise ConfigError(
                    f"vlm_lab: unknown model_args {', '.join(sorted(unknown))}; it takes ckpt=<path.ckpt> "
                    "(batch size and device: lmms-eval's --batch_size and --device)"
                )
            if not ckpt:
                raise ConfigError("vlm_lab needs --model_args ckpt=<path.ckpt>")
            if not str(batch_size).isdigit() or int(batch_size) < 1:
                raise ConfigError(f"vlm_lab: batch_size must be a positive whole number, got '{batch_size}'")
            self.module = VLMLitModule.from_checkpoint(ckpt)
        self.batch_size = int(batch_size)
        if device is None:
            cuda = torch.cuda.is_available()
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu"
        self.device = torch.device(device)
        self.module.to(self.device)
        self.processor = self.module.processor
        self.tokenizer = self.module.tokenizer

    def _prompt(self, context: str, doc_to_visual, task: str, split: str, doc_id: int) -> dict:
        """The processor's prompt for one request: its image (none: text only, where the
        checkpoint's model reads text alone) and the task's text after ``<image>\\n``, as our
        training data asks. A task's own ``<image>`` marks are dropped: the image comes first."""
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) or []
        if len(visuals) > 1 or not all(isinstance(v, Image.Image) for v in visuals):
            kinds = ", ".join(type(v).__name__ for v in visuals)
            raise ValueError(f"vlm_lab reads one PIL image per prompt; {task} doc {doc_id} gives [{kinds}]")
        image = visuals[0].convert("RGB") if visuals else None
        text = context.replace(IMAGE_TOKEN, "").strip()
        question = f"{IMAGE_TOKEN}\n{text}" if image is not None else text
        turns = [{"from": "human", "value": question}, {"from": "gpt", "value": ""}]
        return self.processor.encode_prompt({"image": image, "conversations": turns})

    @torch.inference_mode()
    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Batches of ``batch_size`` prompts that share their generation kwargs (lmms-eval's
        ``Collator`` groups them), longest first so a batch pads little."""
        order = Collator([r.args for r in requests], lambda args: -len(args[0]), grouping=True)
        answers: list[str] = []
        for chunk in tqdm(order.get_batched(n=self.batch_size), disable=self.rank != 0, desc="vlm_lab"):
            items = [self._prompt(ctx, visual, task, split, i) for ctx, _, visual, i, task, split in chunk]
            generation, until = generation_args(chunk[0][1])
            batch = move_data_to_device(self.processor.collate_prompts(items), self.device)
            answers += [cut(a, until) for a in self.module.generate(batch, **generation)]
        return order.get_original(answers)

    @torch.inference_mode()
    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """log P(continuation | prompt) and whether greedy decoding gives exactly the continuation,
        from one forward pass per batch over prompt + continuation (right-padded: positions as in
        training)."""
        scores: list[tuple[float, bool]] = []
        for start in range(0, len(requests), self.batch_size):
            chunk = [r.args for r in requests[start : start + self.batch_size]]
            prompts = [self._prompt(ctx, visual, task, split, i) for ctx, _, visual, i, task, split in chunk]
            conts = [self._continuation(target, task, split, i) for _, target, _, i, task, split in chunk]
            items = [
                {"input_ids": torch.cat([p["input_ids"], c]), "pixel_values": p["pixel_values"]}
                for p, c in zip(prompts, conts, strict=True)
            ]
            batch = move_data_to_device(self.processor.collate(items), self.device)
            logits = self.module.model(**{k: batch[k] for k in MODEL_INPUTS})["logits"]
            for row, p, c in zip(logits.float().log_softmax(-1), prompts, conts, strict=True):
                scores.append(continuation_score(row, len(p["input_ids"]), c.to(row.device)))
        return scores

    def _continuation(self, target, task: str, split: str, doc_id: int) -> torch.Tensor:
        """The continuation's token ids: the reply after the prompt. lmms-eval's leading target
        delimiter (a space, for plain-text LMs) is dropped, as our templates open a reply themselves."""
        text = target if isinstance(target, str) else target(self.task_dict[task][split][doc_id])
        ids = self.tokenizer(text.lstrip(), add_special_tokens=False)["input_ids"]
        return torch.tensor(ids, dtype=torch.long)

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError(
            "vlm_lab answers one question per request: it serves generate_until and loglikelihood "
            "(multiple_choice) requests, not generate_until_multi_round"
        )


def generation_args(gen_kwargs: dict) -> tuple[dict, list[str]]:
    """lmms-eval's generation kwargs as ``module.generate`` overrides, and the stop strings.
    Sampling is on with ``do_sample`` or a positive ``temperature`` (lmms-eval's convention:
    temperature 0 is greedy); options of other models' backends are left out."""
    kwargs = {k: v for k, v in gen_kwargs.items() if k in GENERATION_KEYS and v is not None}
    kwargs["do_sample"] = bool(kwargs.get("do_sample")) or float(kwargs.get("temperature", 0)) > 0
    if not kwargs["do_sample"] or not kwargs.get("temperature"):
        kwargs.pop("temperature", None)
    if not kwargs["do_sample"]:
        kwargs.pop("top_p", None)
    until = gen_kwargs.get("until") or []
    return kwargs, [until] if isinstance(until, str) else list(until)


def continuation_score(logprobs: torch.Tensor, start: int, ids: torch.Tensor) -> tuple[float, bool]:
    """Summed log-probability of ``ids`` placed at ``start`` of a sequence whose per-position
    log-probabilities are ``logprobs`` (T, vocab; position t predicts token t + 1), and whether
    each of them is the most likely token there."""
    predicting = logprobs[start - 1 : start - 1 + len(ids)]
    return float(predicting.gather(-1, ids[:, None]).sum()), bool((predicting.argmax(-1) == ids).all())


def cut(text: str, until: list[str]) -> str:
    """``text`` up to the first of the stop strings found in it."""
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text.strip()

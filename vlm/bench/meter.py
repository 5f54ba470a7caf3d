"""Callbacks that measure the training loop users run, from inside Lightning.

:class:`StepMeter` times optimizer steps after the warm-up and counts the FLOPs of one real
step (forward, backward and optimizer of the actual module, under the trainer's precision)
with ``FlopCounterMode``: a count, not a formula, so frozen parts run without autograd and
skipped tower blocks are simply absent. :class:`GenerationMeter` times batched greedy decoding
once training ends, while the model is still on the device in the trainer's dtype.
"""

from __future__ import annotations

import time

import lightning as L
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch.utils.flop_counter import FlopCounterMode

from vlm.bench.device import peak_memory, reset_peak_memory, synchronize


class StepMeter(L.Callback):
    """Step 1 (a warm-up step, so the counter's overhead is never timed) is counted; steps
    ``warmup + 1 .. warmup + steps`` are timed, each from one step boundary to the next with
    the device synchronised, so a step's time includes the loop's own overhead."""

    def __init__(self, warmup: int, steps: int):
        if warmup < 1 or steps < 1:
            raise ValueError(
                f"bench needs warmup >= 1 (its first step is counted) and steps >= 1, got {warmup}, {steps}"
            )
        self.warmup, self.steps = warmup, steps
        self.flops: int | None = None  # per optimizer step
        self.step_times: list[float] = []
        self.batches = 0  # batches inside the timed window (> steps under grad accumulation)
        self.peak_memory: tuple[int, str] = (0, "")
        self._counter: FlopCounterMode | None = None
        self._clock: float | None = None

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int
    ) -> None:
        if trainer.global_step == 0 and self.flops is None and self._counter is None:
            self._counter = FlopCounterMode(display=False)
            self._counter.__enter__()
        if trainer.global_step == self.warmup and self._clock is None:
            synchronize(pl_module.device)
            reset_peak_memory(pl_module.device)
            self._clock = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        if self._counter is not None and trainer.global_step == 1:
            self._stop_counter()
        if self._clock is None or len(self.step_times) == self.steps:
            return
        self.batches += 1
        if trainer.global_step > self.warmup + len(self.step_times):  # this batch ended a step
            synchronize(pl_module.device)
            now = time.perf_counter()
            self.step_times.append(now - self._clock)
            self._clock = now
            if len(self.step_times) == self.steps:
                self.peak_memory = peak_memory(pl_module.device)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if self._counter is not None:
            self._stop_counter()

    def _stop_counter(self) -> None:
        self._counter.__exit__(None, None, None)
        self.flops = self._counter.get_total_flops()
        self._counter = None


class GenerationMeter(L.Callback):
    """Greedy decoding of exactly ``new_tokens`` (EOS suppressed until then) with the KV cache,
    under the trainer's autocast: one untimed call, then ``repeats`` timed ones. Image encoding
    alone (tower + connector) is timed the same way: what a composite tower adds per image.
    A model with no ``generate`` (a segmenter predicts masks, not text) is left untimed."""

    def __init__(
        self, batch: dict, new_tokens: int, repeats: int, pad_token_id: int, eos_token_id: int,
        cache_implementation: str | None = None,
    ):  # fmt: skip
        self.batch = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
        self.kwargs = dict(
            max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, num_beams=1,
            pad_token_id=pad_token_id, eos_token_id=eos_token_id,
        )  # fmt: skip
        if cache_implementation:  # "static": a preallocated KV cache, transformers' own
            self.kwargs["cache_implementation"] = cache_implementation
        self.repeats = repeats
        self.times: list[float] = []
        self.encode_times: list[float] = []
        self.new_tokens = 0  # as produced, checked against the request
        self.peak_memory: tuple[int, str] = (0, "")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not hasattr(pl_module.model, "generate"):
            return
        device = pl_module.device
        batch = move_data_to_device(self.batch, device)
        pl_module.eval()
        with torch.no_grad(), trainer.precision_plugin.forward_context():
            pl_module.model.encode_images(batch["pixel_values"])
            for _ in range(self.repeats):
                synchronize(device)
                start = time.perf_counter()
                pl_module.model.encode_images(batch["pixel_values"])
                synchronize(device)
                self.encode_times.append(time.perf_counter() - start)
            out = pl_module.model.generate(**batch, **self.kwargs)  # (B, new_tokens)
            self.new_tokens = out.shape[1]
            reset_peak_memory(device)
            for _ in range(self.repeats):
                synchronize(device)
                start = time.perf_counter()
                pl_module.model.generate(**batch, **self.kwargs)
                synchronize(device)
                self.times.append(time.perf_counter() - start)
        self.peak_memory = peak_memory(device)
        pl_module.train()

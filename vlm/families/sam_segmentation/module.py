"""The segmenter's training: the shared LightningModule, with target masks passed to the model,
the loss terms logged, one forward per evaluation batch giving both the loss and the masks
(the teacher-forced loader is skipped: the prompt batch holds the same tokens), the overlay
pictures, and the run's peak memory at its end."""

from __future__ import annotations

import logging
import resource
import sys
from functools import cached_property

import torch

from vlm.core.lit_module import TEACHER_FORCED, VLMLitModule
from vlm.core.monitoring import log_now
from vlm.core.templates import build_template
from vlm.families.sam_segmentation.overlays import Overlays
from vlm.families.sam_segmentation.processor import SegmentationProcessor

log = logging.getLogger(__name__)
GIB = 2**30
LOSS_TERMS = ("loss", "ce", "bce", "dice")


def peak_memory_gib(device: torch.device) -> float:
    """The device's peak allocated memory (CUDA), else the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / GIB
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (GIB if sys.platform == "darwin" else 2**20)


class SegmenterModule(VLMLitModule):
    """``num_overlays``: validation / test samples drawn as image | target | prediction."""

    def __init__(self, *args, num_overlays: int = 8, **kwargs):
        super().__init__(*args, **kwargs)
        self.overlays = Overlays(num_overlays)

    @cached_property
    def processor(self) -> SegmentationProcessor:
        hp, model = self.hparams, self.model
        return SegmentationProcessor(
            self.tokenizer,
            build_template(hp.template, self.tokenizer, hp.system_prompt),
            model.image_transforms(),
            model.num_image_tokens,
            self.max_length(),
            hp.qtype_weights,
            prompt=model.prompt,
            seg_token_id=model.seg_token_id,
            mask_size=model.mask_size,
        )

    def forward(self, batch: dict) -> dict:
        return self.model(
            batch["input_ids"], batch["attention_mask"], batch.get("pixel_values"), batch.get("labels"),
            masks=batch.get("masks"),
        )  # fmt: skip

    def training_step(self, batch: dict, batch_idx: int):
        if not batch:
            return self._empty_step()
        out = self(batch)
        bs = batch["input_ids"].shape[0]
        self.log("train/loss", out["loss"], prog_bar=True, batch_size=bs)
        self.log_dict({f"train/{k}": out[k] for k in LOSS_TERMS[1:] if k in out}, batch_size=bs)
        return out["loss"]

    @torch.no_grad()
    def segment(self, batch: dict) -> list[torch.Tensor]:
        """One boolean (S, S) mask per ``[SEG]`` (or per sample with ``prompt=fused``)."""
        logits = self.model(batch["input_ids"], batch["attention_mask"], batch.get("pixel_values"))[
            "mask_logits"
        ]
        return list(logits > 0)

    def _evaluate(self, batch: dict, split: str, loader: int) -> None:
        if not batch or loader == TEACHER_FORCED:
            return
        out = self(batch)
        bs = batch["input_ids"].shape[0]
        for key in LOSS_TERMS:
            if key in out:
                self.log(f"{split}/{key}", out[key], batch_size=bs, add_dataloader_idx=False)
        predictions = list(out["mask_logits"] > 0)
        self.objective.update(split, batch, predictions)
        self.samples.add(self.objective.rows(batch, predictions, self.tokenizer))
        if len(self.overlays.rows) < self.overlays.size:
            prompts = self.tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True)
            self.overlays.add(self.model.picture(batch.get("pixel_values")), batch, predictions, prompts)

    def _epoch_end(self, split: str) -> None:
        super()._epoch_end(split)
        self.overlays.flush(self.trainer, split, self.global_step)

    def on_train_end(self) -> None:
        self._report_memory("fit")

    def on_test_end(self) -> None:
        self._report_memory("test")

    def _report_memory(self, stage: str) -> None:
        gib = peak_memory_gib(self.device)
        kind = "GPU allocated" if self.device.type == "cuda" else "process RSS"
        if self.trainer.is_global_zero:
            log.info(f"peak memory ({stage}, {kind}): {gib:.2f} GiB")
        log_now(self.trainer, self.global_step, {f"memory/peak_gib_{stage}": gib})

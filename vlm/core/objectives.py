"""Objectives: what a family is measured by, on the prompt batches of validation and test.

The shared LightningModule asks its objective for predictions of a batch, feeds them back to
it, and at the epoch's end logs what it computes (``<split>/<name>``) and the sample rows it
gives. An objective holds one metric state per split; ``monitor`` names the figure that picks
the best checkpoint (``conf/objective/<name>.yaml`` sets ``monitor: val/<monitor>``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from vlm.core.caption_metrics import CaptionMetrics
from vlm.core.classes import Known
from vlm.core.metrics import VQAAccuracy
from vlm.core.seg_metrics import SegmentationIoU, intersection_union
from vlm.core.tokenizer import IMAGE_TOKEN

SPLITS = ("val", "test")


class Objective(Known, nn.Module):
    """Metric states are submodules, so they move to the module's device (DDP syncs them
    there) and stay out of checkpoints."""

    nameable = False  # an abstract base

    monitor: str  # the figure, without its split, that picks the best checkpoint
    progress: tuple[str, ...] = ()  # figures shown on the progress bar

    def __init__(self) -> None:
        super().__init__()
        self.metrics = nn.ModuleDict({split: self.new_metric() for split in SPLITS})

    def new_metric(self) -> Metric:
        raise NotImplementedError

    def predict(self, module: Any, batch: dict) -> list:
        """Predictions for a prompt batch (default: the module's generated text)."""
        return module.generate(batch)

    def update(self, split: str, batch: dict, predictions: list) -> None:
        raise NotImplementedError

    def compute(self, split: str) -> dict[str, Tensor]:
        """Figures by name (without the split), from every batch since the last reset."""
        raise NotImplementedError

    def reset(self, split: str) -> None:
        self.metrics[split].reset()

    def rows(self, batch: dict, predictions: list, tokenizer: Any) -> Iterator[dict]:
        """One row per sample for the predictions table (JSONL in the run, wandb table), made
        as they are taken: only the first few are ever logged."""
        raise NotImplementedError


class VQAObjective(Objective):
    """Normalised exact match, overall (``acc``) and per question type (``acc_<qtype>``, for
    the types in ``qtypes``: the data's ``meta.qtype`` values, ``data.qtypes``)."""

    monitor = "acc"
    progress = ("acc",)

    def __init__(self, qtypes: list[str] | None = None) -> None:
        self.qtypes = list(qtypes or [])
        super().__init__()

    def new_metric(self) -> Metric:
        return VQAAccuracy(self.qtypes)

    @staticmethod
    def batch_qtypes(batch: dict) -> list[str]:
        return [m.get("qtype", "vqa") for m in batch["meta"]]

    def update(self, split: str, batch: dict, predictions: list) -> None:
        self.metrics[split].update(predictions, batch["answer"], self.batch_qtypes(batch))

    def compute(self, split: str) -> dict[str, Tensor]:
        metric = self.metrics[split]
        if not metric.update_called:
            return {}
        return {"acc" if k == "all" else f"acc_{k}": v for k, v in metric.compute().items()}

    def rows(self, batch: dict, predictions: list, tokenizer: Any) -> Iterator[dict]:
        qtypes = self.batch_qtypes(batch)
        for i, ids in enumerate(batch["input_ids"]):
            yield {
                "id": batch["id"][i],
                "qtype": qtypes[i],
                "prompt": tokenizer.decode(ids, skip_special_tokens=True).replace(IMAGE_TOKEN, ""),
                "prediction": predictions[i],
                "answer": batch["answer"][i],
            }


class CaptionObjective(Objective):
    """COCO caption scores of one generated caption per image against all its references:
    BLEU-1..4, METEOR, ROUGE-L, CIDEr-D (``monitor``)."""

    monitor = "cider"
    progress = ("bleu4", "cider")

    def new_metric(self) -> Metric:
        return CaptionMetrics()

    @staticmethod
    def references(batch: dict) -> list[list[str]]:
        """Every reference caption of each image (COCO ``meta.captions``), else the answer."""
        return [m.get("captions") or [a] for m, a in zip(batch["meta"], batch["answer"], strict=True)]

    def update(self, split: str, batch: dict, predictions: list) -> None:
        self.metrics[split].update(predictions, self.references(batch), batch["id"])

    def compute(self, split: str) -> dict[str, Tensor]:
        return self.metrics[split].compute()

    def rows(self, batch: dict, predictions: list, tokenizer: Any) -> Iterator[dict]:
        for i, refs in enumerate(self.references(batch)):
            yield {"id": batch["id"][i], "prediction": predictions[i], "references": refs}


class SegmentationObjective(Objective):
    """Referring / reasoning segmentation: gIoU (``monitor``) and cIoU of the predicted masks
    (logit > 0), overall and per expression type (``meta.qtype``, for the types in ``qtypes``).
    ``predict`` gives the module's mask logits; a sample's row carries its masks' IoU."""

    monitor = "giou"
    progress = ("giou", "ciou")

    def __init__(self, qtypes: list[str] | None = None) -> None:
        self.qtypes = list(qtypes or [])
        super().__init__()

    def new_metric(self) -> Metric:
        return SegmentationIoU(self.qtypes)

    def predict(self, module: Any, batch: dict) -> list:
        return module.segment(batch)

    @staticmethod
    def mask_qtypes(batch: dict) -> list[str]:
        """The sample's type, once per mask it holds."""
        counts = batch["masks_per_sample"].tolist()
        return [
            m.get("qtype", "referring") for m, n in zip(batch["meta"], counts, strict=True) for _ in range(n)
        ]

    def update(self, split: str, batch: dict, predictions: list) -> None:
        self.metrics[split].update(
            torch.stack(predictions), batch["masks"], self.mask_qtypes(batch), batch["mask_scale"]
        )

    def compute(self, split: str) -> dict[str, Tensor]:
        metric = self.metrics[split]
        return metric.compute() if metric.update_called else {}

    def rows(self, batch: dict, predictions: list, tokenizer: Any) -> Iterator[dict]:
        inter, union = intersection_union(torch.stack(predictions), batch["masks"])
        iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union)).tolist()
        start = 0
        for i, n in enumerate(batch["masks_per_sample"].tolist()):
            yield {
                "id": batch["id"][i],
                "qtype": batch["meta"][i].get("qtype", "referring"),
                "prompt": tokenizer.decode(batch["input_ids"][i], skip_special_tokens=True).replace(
                    IMAGE_TOKEN, ""
                ),
                "iou": [round(x, 4) for x in iou[start : start + n]],
            }
            start += n

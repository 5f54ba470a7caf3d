"""Samples with target masks: the conversation as the shared processor encodes it, plus one
(S, S) uint8 mask per ``[SEG]`` (``prompt=seg_token``) or per sample (``prompt=fused``: the
prompt alone, the targets' union as its mask).

Evaluation reads the answer with its ``[SEG]`` too, as LISA's validation does: the masks are
scored, not the generated text.
"""

from __future__ import annotations

import torch

from vlm.core.processor import VLMProcessor
from vlm.data.datasets import SkipSample
from vlm.data.masks import target_masks

SEG_TOKEN = "[SEG]"


class SegmentationProcessor(VLMProcessor):
    def __init__(self, *args, prompt: str, seg_token_id: int, mask_size: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.prompt, self.seg_token_id, self.mask_size = prompt, seg_token_id, mask_size
        for text in (SEG_TOKEN, f"It is {SEG_TOKEN}."):
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if ids.count(seg_token_id) != 1 or (text == SEG_TOKEN and ids != [seg_token_id]):
                raise ValueError(
                    f"the tokenizer encodes {SEG_TOKEN!r} in {text!r} as {ids}, not as id {seg_token_id}"
                )

    def encode(self, sample: dict) -> dict:
        return self._segment(sample, evaluate=False)

    def encode_prompt(self, sample: dict) -> dict:
        return self._segment(sample, evaluate=True)

    def _segment(self, sample: dict, evaluate: bool) -> dict:
        meta = sample.get("meta") or {}
        masks = target_masks(meta, self.mask_size)  # SkipSample("malformed mask") when it is
        if self.prompt == "fused":
            item = self._encode(sample, prompt=True)
            on = (masks == 1).any(0)
            ignored = (masks == 255).any(0) & ~on
            masks = (on.to(torch.uint8) + ignored.to(torch.uint8) * 255)[None]
        else:
            item = self._encode(sample, prompt=False)
            n_seg = int((item["input_ids"] == self.seg_token_id).sum())
            if n_seg != len(masks):
                raise SkipSample(
                    "malformed mask", f"{n_seg} [SEG] tokens in the answer for {len(masks)} masks"
                )
        if not evaluate:
            item = {k: v for k, v in item.items() if k not in ("answer", "meta", "id")}
        else:
            item.update(answer=sample["conversations"][-1]["value"], meta=meta, id=sample.get("id"))
        item["masks"] = masks
        item["mask_scale"] = torch.full((len(masks),), meta["height"] * meta["width"] / self.mask_size**2)
        return item

    def collate(self, items: list[dict | None]) -> dict:
        return self._with_masks(items, left=False)

    def collate_prompts(self, items: list[dict | None]) -> dict:
        return self._with_masks(items, left=True)

    def _with_masks(self, items: list[dict | None], left: bool) -> dict:
        items = [it for it in items if it is not None]
        batch = self._collate(items, left=left)
        if batch:
            batch["masks"] = torch.cat([it["masks"] for it in items])
            batch["mask_scale"] = torch.cat([it["mask_scale"] for it in items])
            batch["masks_per_sample"] = torch.tensor([len(it["masks"]) for it in items])
        return batch

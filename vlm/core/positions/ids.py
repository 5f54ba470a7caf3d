"""Position ids of a batch whose rows hold image spans among text, under any padding.

Every valid token advances the position by one, except inside an image span, where the
tokens take the offsets their layout gives and the span as a whole advances by its extent.
Padding (left or right) takes position 0 and advances nothing, so a left-padded prompt has the
positions of the same prompt unpadded: what ``generate`` continues from, and what a full
forward pass must use to give the same logits.
"""

from __future__ import annotations

import torch
from torch import Tensor


def position_ids(
    input_ids: Tensor, attention_mask: Tensor, image_token_id: int, offsets: Tensor, extent: int
) -> Tensor:
    """(B, T) ids -> (R, B, T) positions, R = ``offsets.shape[0]`` (1: flat, 3: M-RoPE).

    ``offsets`` (R, L): each image token's offset from its span's first position, ``extent``
    the positions a span of ``L`` tokens takes. Consecutive spans (two images back to back)
    are told apart by counting tokens modulo ``L``."""
    valid = attention_mask.bool()
    is_image = (input_ids == image_token_id) & valid
    span = offsets.shape[1]
    counts = is_image.sum(-1)
    if bool((counts % span).any()):
        bad = int(counts[counts % span != 0][0])
        raise ValueError(f"a row holds {bad} image tokens, not a multiple of the image span ({span} tokens)")
    index = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    starts = is_image & ~torch.nn.functional.pad(is_image, (1, -1), value=False)
    run_start = torch.where(starts, index, torch.zeros_like(index)).cummax(-1).values
    within = ((index - run_start) % span).masked_fill(~is_image, 0)  # 0..L-1 inside a span
    last = is_image & (within == span - 1)
    advance = valid.long() - is_image.long() + last.long() * extent
    base = advance.cumsum(-1) - advance  # exclusive: the position where each token starts
    offsets = offsets.to(input_ids.device)
    image_offset = offsets[:, within] * is_image  # (R, B, T)
    return (base + image_offset).masked_fill(~valid, 0)

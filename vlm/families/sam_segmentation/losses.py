"""LISA's mask losses (sigmoid BCE and Dice, each a mean over masks), with ignored pixels
(label 255) left out of both: LISA's own loss reads 255 as a target value."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_LABEL = 255
DICE_SCALE, DICE_EPS = 1000.0, 1e-6  # LISA's: the scale keeps the sums of large masks in range


def mask_losses(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """(M, S, S) logits and uint8 targets (0, 1, 255) -> (bce, dice), each averaged over masks;
    BCE per mask is the mean over its counted pixels."""
    valid = (targets != IGNORE_LABEL).flatten(1).float()
    x = logits.float().flatten(1)
    t = (targets == 1).flatten(1).float()
    bce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    bce = (bce * valid).sum(1) / valid.sum(1).clamp(min=1)
    p, t = torch.sigmoid(x) * valid / DICE_SCALE, t * valid
    dice = 1 - (2 * (p * t).sum(1) + DICE_EPS) / (p.sum(1) + t.sum(1) / DICE_SCALE + DICE_EPS)
    return bce.mean(), dice.mean()

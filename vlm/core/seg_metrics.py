"""gIoU and cIoU of referring / reasoning segmentation, as LISA defines them (Lai et al. 2024):
gIoU is the mean over masks of each mask's intersection over union (1 when the union is empty:
an empty prediction of an empty target is right), cIoU the summed intersections over the summed
unions of the whole split. Pixels labelled 255 count in neither.

Intersections and unions are counted on the (S, S) grid the masks are predicted on, then
weighted by each mask's ``scale`` (original pixels per grid pixel), so cIoU weighs images by
their original areas as it does at full resolution; a mask's own I/U needs no weight.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

IGNORE_LABEL = 255


def intersection_union(pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """(M, S, S) bool predictions and uint8 targets (0, 1, 255) -> per-mask (I, U) pixel counts."""
    valid = target != IGNORE_LABEL
    p, t = pred.bool() & valid, (target == 1) & valid
    return (p & t).flatten(1).sum(1).double(), (p | t).flatten(1).sum(1).double()


class SegmentationIoU(Metric):
    """``compute`` -> {"giou", "ciou", "giou_<qtype>", "ciou_<qtype>"}; per-type sums are plain
    tensor states (types fixed at construction) that torchmetrics sums across DDP ranks."""

    full_state_update = False

    def __init__(self, qtypes: list[str] | None = None, **kwargs):
        super().__init__(**kwargs)
        self.qtypes = list(qtypes or [])
        n = len(self.qtypes) + 1  # last slot: types not in the list
        for name in ("iou_sum", "count", "inter", "union"):
            self.add_state(name, default=torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, pred: Tensor, target: Tensor, qtypes: list[str], scale: Tensor | None = None) -> None:
        """One qtype per mask; ``scale`` (M,): original pixels per grid pixel (default 1)."""
        inter, union = intersection_union(pred, target)
        iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
        w = torch.ones_like(inter) if scale is None else scale.to(inter)
        slot = torch.tensor(
            [self.qtypes.index(q) if q in self.qtypes else len(self.qtypes) for q in qtypes],
            device=inter.device,
        )
        self.iou_sum.index_add_(0, slot, iou)
        self.count.index_add_(0, slot, torch.ones_like(iou))
        self.inter.index_add_(0, slot, inter * w)
        self.union.index_add_(0, slot, union * w)

    def compute(self) -> dict[str, Tensor]:
        out = {"giou": self._giou(slice(None)), "ciou": self._ciou(slice(None))}
        for i, qt in enumerate(self.qtypes):
            if self.count[i] > 0:
                out[f"giou_{qt}"], out[f"ciou_{qt}"] = self._giou(i), self._ciou(i)
        return {k: v.float() for k, v in out.items()}

    def _giou(self, i) -> Tensor:
        return self.iou_sum[i].sum() / self.count[i].sum().clamp(min=1)

    def _ciou(self, i) -> Tensor:
        union = self.union[i].sum()
        return (
            self.inter[i].sum() / union
            if union > 0
            else torch.ones((), dtype=union.dtype, device=union.device)
        )

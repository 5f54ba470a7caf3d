"""Learning-rate schedules as ``LambdaLR`` factories with linear warmup.

Configs carry ``_partial_: true``; the LightningModule completes them with the optimizer and
``total_steps = trainer.estimated_stepping_batches`` (see ``vlm.core.optim``). Warmup is a
ratio of ``total_steps`` (LLaVA's ``warmup_ratio: 0.03``) unless ``warmup_steps`` is given.

The factor at optimizer step ``s`` (0-based) is ``(s + 1) / (w + 1)`` during warmup, so the
first update already has a non-zero learning rate, reaches 1 at ``s = w`` and then decays to
``min_lr_ratio`` at ``s = total_steps`` (held there afterwards).

A restored schedule takes its learning rate from the restored step and its own ``total_steps``
(see ``StepSchedule``), so a run resumed with a larger ``trainer.max_steps`` follows the longer
schedule from its first step on.
"""

import math
from collections.abc import Callable

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def warmup_length(total_steps: int, warmup_ratio: float = 0.0, warmup_steps: int | None = None) -> int:
    """Number of warmup steps: ``warmup_steps`` if set, else ``round(ratio * total_steps)``."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    if warmup_steps is not None:
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        return min(warmup_steps, total_steps)
    if not 0.0 <= warmup_ratio <= 1.0:
        raise ValueError(f"warmup_ratio must be in [0, 1], got {warmup_ratio}")
    return round(warmup_ratio * total_steps)


class StepSchedule(LambdaLR):
    """``LambdaLR`` whose ``load_state_dict`` re-derives the learning rate from the restored step.

    A checkpoint holds the optimizer's last learning rate, computed by the schedule of the run
    that wrote it; Lightning restores the optimizer, then the scheduler, and the next step uses
    that rate. When the resumed run is longer (``max_steps`` raised) that rate belongs to the old
    schedule (0 at the end of a cosine), so the first resumed step would be wasted.
    """

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._last_lr = [
            base * fn(self.last_epoch) for base, fn in zip(self.base_lrs, self.lr_lambdas, strict=True)
        ]
        for group, lr in zip(self.optimizer.param_groups, self._last_lr, strict=True):
            group["lr"] = lr


def _schedule(
    decay: Callable[[float], float], total_steps: int, warmup_ratio: float, warmup_steps: int | None
) -> Callable[[int], float]:
    """Factor of step ``s``: linear warmup, then ``decay(progress)`` with progress in [0, 1]."""
    warmup = warmup_length(total_steps, warmup_ratio, warmup_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return decay(progress)

    return factor


def _decaying(name: str, decay: Callable[[float], float], doc: str) -> Callable[..., LambdaLR]:
    """A schedule that warms up, then follows ``min_lr_ratio + (1 - min_lr_ratio) * decay(progress)``,
    ``decay`` going from 1 at progress 0 to 0 at progress 1."""

    def schedule(
        optimizer: Optimizer,
        total_steps: int,
        warmup_ratio: float = 0.0,
        warmup_steps: int | None = None,
        min_lr_ratio: float = 0.0,
    ) -> LambdaLR:
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")

        def factor(progress: float) -> float:
            return min_lr_ratio + (1.0 - min_lr_ratio) * decay(progress)

        return StepSchedule(optimizer, _schedule(factor, total_steps, warmup_ratio, warmup_steps))

    schedule.__name__ = schedule.__qualname__ = name
    schedule.__doc__ = doc
    return schedule


cosine_warmup = _decaying(
    "cosine_warmup",
    lambda progress: 0.5 * (1.0 + math.cos(math.pi * progress)),
    "Linear warmup, then half a cosine from 1 down to ``min_lr_ratio`` (LLaVA's schedule).",
)
linear_warmup = _decaying(
    "linear_warmup",
    lambda progress: 1.0 - progress,
    "Linear warmup, then a straight line from 1 down to ``min_lr_ratio``.",
)


def constant(
    optimizer: Optimizer, total_steps: int, warmup_ratio: float = 0.0, warmup_steps: int | None = None
) -> LambdaLR:
    """Linear warmup, then the base learning rate."""
    return StepSchedule(optimizer, _schedule(lambda progress: 1.0, total_steps, warmup_ratio, warmup_steps))

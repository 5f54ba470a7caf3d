"""Encoder depths in proportion: a layer choice written for one depth, applied to another.

Papers name blocks of the encoder they used (CLIP-L: 24 blocks). For an encoder of depth N,
block ``i`` of a ``reference``-deep one is ``⌊i·N/ref + ½⌋``, so a choice keeps its relative
depth whatever tower a config picks (layer sets, dense connectors' middle layers).
"""

from __future__ import annotations

import math


def mapped_end(i: int, depth: int, reference: int) -> int:
    """``⌊i·N/ref + ½⌋``: where position ``i`` of a ``reference``-deep encoder falls in a
    ``depth``-deep one (0 stays 0, so interval bounds map too)."""
    return math.floor(i * depth / reference + 0.5)


def map_block(i: int, depth: int, reference: int) -> int:
    """Block ``i`` of a ``reference``-deep encoder, in proportion, for a ``depth``-deep one."""
    return min(depth, max(1, mapped_end(i, depth, reference)))

"""Where the CALM modules sit: composition layers on the anchor and their augmenting partners.

Layers are 1-based block indices (``hidden_states[l]`` is the output of block ``l``), as in
CALM's ``L = {i * gap : i = 1..n}`` with ``gap = N / n``.
"""

from __future__ import annotations


def composition_layers(depth: int, n: int) -> list[int]:
    """``n`` uniformly spaced anchor layers: N=24, n=4 -> [6, 12, 18, 24]."""
    if n < 1 or depth % n:
        divisors = [d for d in range(1, depth + 1) if depth % d == 0]
        raise ValueError(
            f"calm.num_layers={n} does not divide the anchor's {depth} blocks (gap = N/n must be "
            f"a whole number); choose one of {divisors}"
        )
    gap = depth // n
    return [i * gap for i in range(1, n + 1)]


def augmenting_layer(layer: int, anchor_depth: int, augmenting_depth: int) -> int:
    """The augmenting block paired with anchor block ``layer``: the same relative depth,
    ``round(layer * M / N)`` clamped to 1..M. Equal depths pair a layer with itself; a
    24-block anchor with a 12-block augmenting tower pairs 6, 12, 18, 24 with 3, 6, 9, 12."""
    return min(augmenting_depth, max(1, round(layer * augmenting_depth / anchor_depth)))

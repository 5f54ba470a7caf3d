"""Layer sets: which encoder blocks feed the fusion, and which LLM layer each one reaches.

A set is written for a reference depth (the paper's 24-block CLIP-L) as block indices 1..24
(``hidden_states[i]``, the output of block ``i``) and ``[first, last]`` groups (``former`` =
``[1, 12]``). For an encoder of depth N a block maps to ``⌊i·N/24 + ½⌋`` and a group's bounds
map as the interval ``(first-1, last]``, so groups that tile 1..24 tile 1..N::

    24 blocks (CLIP-L):       3, 18, 23   former 1-12   latter 13-24
    27 blocks (SigLIP so400m): 3, 20, 26   former 1-14   latter 15-27
    12 blocks:                2,  9, 12   former 1-6    latter 7-12

With ``reference: null`` the indices are the encoder's own blocks, unmapped.
"""

from __future__ import annotations

from dataclasses import dataclass

from vlm.core.depth import map_block, mapped_end

Group = tuple[int, ...]  # encoder blocks, 1-based; one block or a contiguous range


@dataclass(frozen=True)
class LayerSet:
    """A resolved set: each entry a group of the encoder's own blocks (1-tuples for single
    layers), in the order written."""

    name: str
    groups: tuple[Group, ...]

    @property
    def blocks(self) -> list[int]:
        """Every block the set touches, in order, repeats kept (internal fusion injects each)."""
        return [b for g in self.groups for b in g]

    @property
    def deepest(self) -> int:
        return max(self.blocks)


def resolve(name: str, blocks: list, depth: int, reference: int | None, encoder: str = "encoder") -> LayerSet:
    """``blocks`` as written in ``conf/layers`` -> the encoder's own block groups.

    Fails in one line naming the set when an index lies outside the depth it is written for.
    """
    if not blocks:
        raise ValueError(f"layers={name}: the set is empty; list blocks like [3, 18] or [[1, 12]]")
    limit = reference or depth
    where = (
        f"the {reference}-block reference depth" if reference else f"the {depth}-block encoder '{encoder}'"
    )
    groups = []
    for entry in blocks:
        first, last = (entry, entry) if isinstance(entry, int) else tuple(entry)
        if not 1 <= first <= last <= limit:
            shown = list(entry) if first != last else first
            raise ValueError(f"layers={name}: block {shown} is outside {where} (valid 1..{limit})")
        if reference:
            if first == last:
                first = last = map_block(first, depth, reference)
            else:
                first = max(1, mapped_end(first - 1, depth, reference) + 1)
                last = max(first, mapped_end(last, depth, reference))
        groups.append(tuple(range(first, last + 1)))
    return LayerSet(name, tuple(groups))


def llm_target(block: int, encoder_depth: int, llm_depth: int) -> int:
    """The 0-based LLM layer that receives encoder block ``block`` (1-based): the layer at the
    same relative depth, ``⌊ℓ·L/N⌋ - 1`` (3, 18, 23 of 24 -> 2, 17, 22 of 24), at least 0."""
    return max(0, block * llm_depth // encoder_depth - 1)

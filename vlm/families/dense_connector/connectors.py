"""Dense Connector (Yao et al. 2024, *Dense Connector for MLLMs*): the tower's intermediate
hidden states reach the LLM beside the one LLaVA reads, through the usual 2-layer MLP.

Hidden state ``i`` is the output of block ``i`` (0: the patch embeddings). On the paper's
24-block CLIP-L:

- ``sti`` (sparse token integration): states 7 and 15, each average-pooled along the tokens
  (1-D, kernel = stride = 8), appended to the final feature's tokens: T + 2·⌊T/8⌋ tokens of C.
- ``sci`` (sparse channel integration): the final feature and states 7, 15 along channels: 3C.
- ``dci`` (dense channel integration): states 0..N-1 split into ``groups`` consecutive groups
  (2: 0-11 and 12-23), each averaged, then concatenated with the final feature: (g+1)·C.

The final feature is the model's ``select_layer`` (-2: state N-1). For another depth N the
middle states map in proportion, ``⌊i·N/24 + ½⌋`` (12 blocks: 4 and 8; 27: 8 and 17), and
group ``j`` of g is states ``⌊jN/g⌋ .. ⌊(j+1)N/g⌋ - 1`` (12 blocks, g=4: 0-2, 3-5, 6-8, 9-11).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vlm.core.connectors import Connector
from vlm.core.depth import map_block
from vlm.core.positions.layout import Piece

MODES = ("sti", "sci", "dci")
REFERENCE_DEPTH = 24
MIDDLE_STATES = (7, 15)  # of the 24-block reference, as the paper's code reads them


def middle_states(depth: int) -> tuple[int, ...]:
    """The two middle hidden states ``sti``/``sci`` read, for a ``depth``-block tower."""
    return tuple(map_block(i, depth, REFERENCE_DEPTH) for i in MIDDLE_STATES)


def state_groups(depth: int, groups: int) -> tuple[range, ...]:
    """States 0..depth-1 in ``groups`` consecutive, near-equal groups (``dci``)."""
    if not 1 <= groups <= depth:
        raise ValueError(
            f"connector.groups={groups}: a {depth}-block encoder has {depth} hidden states "
            f"to average in groups (0..{depth - 1}); choose 1..{depth}"
        )
    return tuple(range(j * depth // groups, (j + 1) * depth // groups) for j in range(groups))


class DenseConnector(nn.Module):
    """``mode`` picks how the states join; the MLP (``mlp_depth`` Linear layers, GELU between)
    maps the joined width to the LLM's. ``tower_depth`` is given by the family's model: a
    model that reads one layer cannot feed this connector."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        mode: str,
        tower_depth: int | None = None,
        groups: int = 2,
        stride: int = 8,
        mlp_depth: int = 2,
        activation: str = "gelu",
    ):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"dense connector mode {mode!r}: choose from {', '.join(MODES)}")
        if tower_depth is None:
            raise ValueError(
                f"connector=dense_{mode} reads several encoder layers: use it with family=dense_connector"
            )
        self.mode, self.stride = mode, stride
        self.layers = middle_states(tower_depth) if mode != "dci" else ()
        self.groups = state_groups(tower_depth, groups) if mode == "dci" else ()
        joined = {"sti": 1, "sci": 1 + len(self.layers), "dci": 1 + len(self.groups)}[mode]
        self.mlp = Connector(joined * in_dim, out_dim, mlp_depth, activation)
        self.in_dim, self.out_dim = in_dim, out_dim

    @property
    def deepest(self) -> int:
        """The deepest hidden state read besides the final feature."""
        return max(self.layers) if self.layers else self.groups[-1][-1]

    def num_tokens(self, num_in: int) -> int:
        if self.mode != "sti":
            return num_in
        if num_in < self.stride:
            raise ValueError(
                f"connector=dense_sti pools {self.stride} tokens into one but the tower gives {num_in}"
            )
        return num_in + len(self.layers) * (num_in // self.stride)

    def token_layout(self, side: int) -> tuple[Piece, ...]:
        """The final feature's grid; ``sti``'s pooled runs of row-major tokens have no 2-D place."""
        pooled = (Piece(side * side // self.stride),) * len(self.layers) if self.mode == "sti" else ()
        return (Piece(side, side), *pooled)

    def pool(self, h: Tensor) -> Tensor:
        """(B, T, C) -> (B, ⌊T/stride⌋, C): 1-D average pooling along the tokens."""
        return nn.functional.avg_pool1d(h.transpose(1, 2), self.stride, self.stride).transpose(1, 2)

    def forward(self, final: Tensor, states: list[Tensor]) -> Tensor:
        """``final`` (B, T, C); ``states``: hidden states 0.. at least :attr:`deepest`, each
        (B, T, C) with the prefix tokens already dropped as for ``final``."""
        if self.mode == "sti":
            joined = torch.cat([final, *(self.pool(states[i]) for i in self.layers)], dim=1)
        elif self.mode == "sci":
            joined = torch.cat([final, *(states[i] for i in self.layers)], dim=-1)
        else:
            means = [torch.stack([states[i] for i in g]).mean(0) for g in self.groups]
            joined = torch.cat([*means, final], dim=-1)
        return self.mlp(joined)

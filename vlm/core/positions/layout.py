"""Where an image's tokens sit: the image span as pieces, each a row-major grid or a run of
tokens without a 2-D place (a CLS token, dense STI's 1-D pooled tokens).

The model knows its span (tower grid, ``select_feature``, connector); a position scheme reads
it from here, so no scheme needs to know which tower or connector made the tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Piece:
    """``rows`` x ``cols`` tokens in row-major order, or ``rows`` tokens of no grid (``cols`` 0)."""

    rows: int
    cols: int = 0

    @property
    def is_grid(self) -> bool:
        return self.cols > 0

    @property
    def length(self) -> int:
        return self.rows * self.cols if self.is_grid else self.rows


@dataclass(frozen=True)
class ImageLayout:
    pieces: tuple[Piece, ...]

    @property
    def length(self) -> int:
        return sum(p.length for p in self.pieces)

    @property
    def grid(self) -> tuple[int, int]:
        """The largest grid's rows and columns: the units 2-D coordinates are given in."""
        grids = [p for p in self.pieces if p.is_grid]
        if not grids:
            raise ValueError("the image span has no 2-D grid")
        return max(p.rows for p in grids), max(p.cols for p in grids)

    def mrope_offsets(self) -> tuple[Tensor, int]:
        """(3, length) temporal/height/width offsets of each token from the span's first
        position, and the positions the span takes (the next text token's offset), as Qwen2-VL
        lays an image out: a grid's tokens share their temporal position, its rows and columns
        count from there, and what follows starts past the largest of them. A token of no
        grid takes one position on all three rows."""
        rows: list[Tensor] = []
        start = 0
        for p in self.pieces:
            if p.is_grid:
                r = torch.arange(p.rows).repeat_interleave(p.cols)
                c = torch.arange(p.cols).repeat(p.rows)
                rows.append(torch.stack([torch.zeros_like(r), r, c]) + start)
                start += max(p.rows, p.cols)
            else:
                rows.append(torch.arange(p.rows).expand(3, -1) + start)
                start += p.rows
        return torch.cat(rows, 1), start

    def coordinates(self) -> tuple[Tensor, Tensor, Tensor]:
        """Each token's (y, x) cell centre in units of the largest grid's cells (a pooled grid's
        cell sits where the cells it pooled do), and whether it has a 2-D place at all."""
        big_rows, big_cols = self.grid
        ys, xs, on_grid = [], [], []
        for p in self.pieces:
            if p.is_grid:
                y = (torch.arange(p.rows, dtype=torch.float64) + 0.5) * big_rows / p.rows - 0.5
                x = (torch.arange(p.cols, dtype=torch.float64) + 0.5) * big_cols / p.cols - 0.5
                ys.append(y.repeat_interleave(p.cols))
                xs.append(x.repeat(p.rows))
                on_grid.append(torch.ones(p.length, dtype=torch.bool))
            else:
                ys.append(torch.zeros(p.rows, dtype=torch.float64))
                xs.append(torch.zeros(p.rows, dtype=torch.float64))
                on_grid.append(torch.zeros(p.rows, dtype=torch.bool))
        return torch.cat(ys), torch.cat(xs), torch.cat(on_grid)

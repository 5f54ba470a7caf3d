"""Segmentation targets: a record's COCO masks rasterised at the model's square input size.

A record (see ``vlm.data.seg_readers``) holds one COCO ``segmentation`` per ``[SEG]`` of its
answer -- a polygon list ``[[x0, y0, x1, y1, ...], ...]`` or an RLE ``{"size": [h, w], "counts"}``
-- plus ``ignore`` regions, in the coordinates of the original ``width`` x ``height`` image.

Geometry: the image transform squashes the image to ``size`` x ``size`` (no crop), so masks are
squashed the same way. Points are pixel-centre coordinates (PIL and OpenCV draw them so, and
ShapesWorld renders with PIL): ``x' = (x + 0.5) * size / width - 0.5`` maps pixel centres as an
image resize does, and at ``size == width`` PIL fills exactly the pixels ShapesWorld rendered
(PIL's fill rounds vertices, so a scaled edge may move by under an output pixel).

Precedence follows LISA's ``get_mask_from_json`` for ReasonSeg: regions (each polygon, each
RLE) are painted largest first, target as 1 and ignore as 255, so where regions overlap the
smaller one decides (an ignored hole in a target, or a target inside an ignored area); on
equal areas ignore wins.

RLE is decoded here rather than by pycocotools, whose C decoder trusts the counts: a crafted
file could write past its buffer. Every count is checked to fill exactly ``h * w`` pixels.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from vlm.data.datasets import SkipSample

IGNORE = 255  # label of pixels that neither loss nor metrics count
MALFORMED = "malformed mask"


def target_masks(meta: dict, size: int) -> torch.Tensor:
    """(K, size, size) uint8: 1 inside target k, 0 outside, 255 where ignored; K = len(masks).

    A mask that cannot be drawn raises ``SkipSample("malformed mask")``, so the dataset's
    ``on_bad_sample`` policy skips and counts the record or stops naming it."""
    h, w = meta.get("height"), meta.get("width")
    if not (_is_int(h) and _is_int(w) and h > 0 and w > 0):
        raise SkipSample(MALFORMED, f"image size {h}x{w} is not two positive integers")
    masks, ignore = meta.get("masks"), meta.get("ignore", [])
    if not isinstance(masks, list) or not isinstance(ignore, list):
        raise SkipSample(MALFORMED, "'masks' and 'ignore' must be lists")
    ignored = [(area, m, IGNORE) for seg in ignore for area, m in _regions(seg, h, w, size)]
    out = torch.zeros(len(masks), size, size, dtype=torch.uint8)
    for k, seg in enumerate(masks):
        regions = [(area, m, 1) for area, m in _regions(seg, h, w, size)] + ignored
        for _, m, value in sorted(regions, key=lambda r: (-r[0], r[2])):  # largest first
            out[k][m] = value
    return out


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _regions(seg: Any, h: int, w: int, size: int) -> list[tuple[float, torch.Tensor]]:
    """(area in original pixels, (size, size) bool) for each region of one COCO segmentation."""
    if isinstance(seg, dict):
        ones, grid = _decode_rle(seg, h, w)
        return [(float(ones), _squash(grid, size))]
    if not isinstance(seg, list):
        raise SkipSample(
            MALFORMED, f"a segmentation is a polygon list or an RLE dict, not {type(seg).__name__}"
        )
    return [_polygon(poly, h, w, size) for poly in seg]


def _polygon(poly: Any, h: int, w: int, size: int) -> tuple[float, torch.Tensor]:
    if not isinstance(poly, list) or not all(_is_number(v) for v in poly):
        raise SkipSample(MALFORMED, "a polygon is a flat list of numbers [x0, y0, x1, y1, ...]")
    if len(poly) % 2:
        raise SkipSample(MALFORMED, f"a polygon needs an even count of coordinates, got {len(poly)}")
    if len(poly) < 6:  # COCO holds a few 1- and 2-point pieces: they enclose nothing
        return 0.0, torch.zeros(size, size, dtype=torch.bool)
    xs, ys = poly[0::2], poly[1::2]
    pairs = zip(xs, ys, xs[1:] + xs[:1], ys[1:] + ys[:1], strict=True)
    area = abs(sum(x0 * y1 - x1 * y0 for x0, y0, x1, y1 in pairs)) / 2  # shoelace
    sx, sy = size / w, size / h  # (x + 0.5) * sx - 0.5, written to be exact at sx = 1
    scaled = [(x * sx + (sx - 1) / 2, y * sy + (sy - 1) / 2) for x, y in zip(xs, ys, strict=True)]
    canvas = Image.new("L", (size, size), 0)
    ImageDraw.Draw(canvas).polygon(scaled, fill=1)
    return area, torch.from_numpy(np.array(canvas, dtype=bool))


def _squash(grid: torch.Tensor, size: int) -> torch.Tensor:
    """Nearest resize of an (h, w) mask to (size, size), sampling at pixel centres."""
    h, w = grid.shape
    rows = ((torch.arange(size) + 0.5) * (h / size)).long().clamp(max=h - 1)
    cols = ((torch.arange(size) + 0.5) * (w / size)).long().clamp(max=w - 1)
    return grid[rows][:, cols]


def _decode_rle(rle: dict, h: int, w: int) -> tuple[int, torch.Tensor]:
    """(pixels set, (h, w) bool) of a COCO RLE whose ``size`` must be [h, w]; ``counts`` is
    COCO's compressed string or its uncompressed list, column-major, starting with zeros."""
    size = rle.get("size")
    if not isinstance(size, (list, tuple)) or list(size) != [h, w]:
        raise SkipSample(MALFORMED, f"RLE size {size} is not the image's [{h}, {w}]")
    counts = rle.get("counts")
    if isinstance(counts, (str, bytes)):
        counts = _rle_counts(counts)
    if not isinstance(counts, list) or not all(_is_int(c) and c >= 0 for c in counts):
        raise SkipSample(MALFORMED, "RLE counts are a string or a list of non-negative integers")
    if sum(counts) != h * w:
        raise SkipSample(MALFORMED, f"RLE counts cover {sum(counts)} pixels, the image has {h * w}")
    values = torch.arange(len(counts)) % 2 == 1  # runs of zeros, ones, zeros, ...
    flat = torch.repeat_interleave(values, torch.tensor(counts, dtype=torch.long))
    return sum(counts[1::2]), flat.view(w, h).T  # column-major


def _rle_counts(s: str | bytes) -> list[int]:
    """The counts of COCO's compressed RLE string (maskApi.c ``rleFrString``): each count in
    5-bit groups (+48, 0x20 = more follows, 0x10 = sign of the last), and from the fourth on
    as the difference to the count two before."""
    counts: list[int] = []
    x = k = 0
    for code in s if isinstance(s, bytes) else map(ord, s):
        c = code - 48
        if not 0 <= c < 64:
            raise SkipSample(MALFORMED, f"RLE string has a character outside '0'..'o': {chr(code)!r}")
        x |= (c & 0x1F) << (5 * k)
        k += 1
        if c & 0x20:
            continue
        if c & 0x10:
            x |= -1 << (5 * k)
        counts.append(x + counts[-2] if len(counts) > 2 else x)
        x = k = 0
    if k:
        raise SkipSample(MALFORMED, "RLE string ends inside a count")
    return counts

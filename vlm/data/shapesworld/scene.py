"""Scenes of non-overlapping coloured shapes and their rendering.

Every shape is a polygon (a circle is a 24-gon), and the same polygon is drawn,
stored as the COCO segmentation and measured for the area, so pixels, masks and
boxes can never disagree.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from functools import cached_property

from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (150, 60, 190),
    "orange": (245, 130, 30),
    "cyan": (40, 200, 210),
    "gray": (110, 110, 110),
}

# name -> (number of sides, angle of the first vertex in degrees); squares are axis-aligned.
SHAPES: dict[str, tuple[int, float]] = {
    "circle": (24, 0.0),
    "square": (4, 45.0),
    "triangle": (3, -90.0),
    "diamond": (4, 0.0),
    "pentagon": (5, -90.0),
    "hexagon": (6, 0.0),
}

BACKGROUND = (235, 235, 235)


@dataclass(frozen=True)
class Shape:
    """One object; (cx, cy) and radius r (circumradius) are in pixels. Geometry is computed once."""

    color: str
    shape: str
    cx: float
    cy: float
    r: float

    @cached_property
    def polygon(self) -> list[tuple[float, float]]:
        sides, start = SHAPES[self.shape]
        step = 2 * math.pi / sides
        a0 = math.radians(start)
        return [
            (
                round(self.cx + self.r * math.cos(a0 + k * step), 2),
                round(self.cy + self.r * math.sin(a0 + k * step), 2),
            )
            for k in range(sides)
        ]

    @cached_property
    def bbox(self) -> list[float]:
        """COCO [x, y, w, h] of the polygon."""
        xs, ys = zip(*self.polygon, strict=True)  # (x, y) pairs
        return [min(xs), min(ys), round(max(xs) - min(xs), 2), round(max(ys) - min(ys), 2)]

    @cached_property
    def area(self) -> float:
        """Shoelace area of the polygon."""
        p = self.polygon
        s = sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(p, p[1:] + p[:1], strict=True))
        return round(abs(s) / 2, 2)

    @cached_property
    def x_range(self) -> tuple[float, float]:
        x, _, w, _ = self.bbox
        return x, x + w


def sample_scene(
    rng: random.Random, size: int, colors: list[str], shapes: list[str], min_shapes: int, max_shapes: int
) -> list[Shape]:
    """Place n shapes (n uniform in [min, max]) with a gap between their circumcircles.

    Uniform n keeps the count answers balanced; radii scale with the image so a
    scene looks the same at 32 and 64 px.
    """
    n = rng.randint(min_shapes, max_shapes)
    r_lo, r_hi = 0.10 * size, 0.17 * size
    gap = max(1.0, 0.03 * size)
    placed: list[Shape] = []
    while len(placed) < n:
        for _ in range(200):
            r = rng.uniform(r_lo, r_hi)
            cx, cy = rng.uniform(r + 1, size - r - 1), rng.uniform(r + 1, size - r - 1)
            if all(math.hypot(cx - s.cx, cy - s.cy) > r + s.r + gap for s in placed):
                placed.append(
                    Shape(rng.choice(colors), rng.choice(shapes), round(cx, 2), round(cy, 2), round(r, 2))
                )
                break
        else:  # crowded: start over (rare with <= 4 shapes)
            placed = []
    return placed


def render(scene: list[Shape], size: int) -> Image.Image:
    """RGB image of the scene on a plain background."""
    img = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for s in scene:
        draw.polygon(s.polygon, fill=COLORS[s.color])
    return img

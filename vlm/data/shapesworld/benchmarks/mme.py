"""MME's perception subtasks about objects (Fu et al. 2023): existence, count, position, color.

MME's release keeps each image beside a txt of its two questions, one answered Yes and one No
(a model scores the image's "acc+" only when it gets both right). A subtask holds the images its
question can be asked of: position needs two uniquely named shapes clearly left/right of each
other, color a shape that is the only one of its kind.
"""

from __future__ import annotations

import random

from ..questions import left_of, name, unique
from ..scene import Shape
from ..writers import ImageEntry

SUBTASKS = ("existence", "count", "position", "color")
SUFFIX = " Please answer yes or no."


def _count(n: int) -> str:
    return "Is there 1 shape in this image?" if n == 1 else f"Are there {n} shapes in this image?"


def pairs(
    scene: list[Shape], rng: random.Random, colors: list[str], shapes: list[str], max_shapes: int
) -> dict[str, tuple[str, str]]:
    """Subtask → (question answered Yes, question answered No) about the scene, for the subtasks
    it allows; the wrong count is another count the generator draws (1..max_shapes)."""
    out = {}
    have = sorted({(s.color, s.shape) for s in scene})
    if absent := [(c, k) for c in colors for k in shapes if (c, k) not in have]:
        (c, k), (c2, k2) = rng.choice(have), rng.choice(absent)
        out["existence"] = (f"Is there a {c} {k} in this image?", f"Is there a {c2} {k2} in this image?")
    n = len(scene)
    out["count"] = (
        _count(n),
        _count(rng.choice([m for m in range(1, max(max_shapes, n + 1) + 1) if m != n])),
    )
    named = unique(scene, name)
    if ordered := [(a, b) for a in named for b in named if left_of(a, b)]:
        a, b = rng.choice(ordered)
        x, y, true, false = (a, b, "left", "right") if rng.random() < 0.5 else (b, a, "right", "left")
        out["position"] = (
            f"Is the {name(x)} on the {true} of the {name(y)}?",
            f"Is the {name(x)} on the {false} of the {name(y)}?",
        )
    if (alone := unique(scene, lambda s: s.shape)) and len(colors) > 1:
        s = rng.choice(alone)
        other = rng.choice([c for c in colors if c != s.color])
        out["color"] = (f"Is the {s.shape} {s.color}?", f"Is the {s.shape} {other}?")
    return out


def mme_files(
    entries: list[ImageEntry], colors: list[str], shapes: list[str], max_shapes: int, seed: int
) -> dict[str, bytes | ImageEntry]:
    """Paths under mme/ → file bytes, or the entry whose image goes there."""
    files: dict[str, bytes | ImageEntry] = {}
    for e in entries:
        rng = random.Random(f"shapesworld:{seed}:mme:{e.id}")
        for task, (yes, no) in pairs(e.scene, rng, colors, shapes, max_shapes).items():
            stem = f"{task}/{e.cocoid:012d}"
            files[f"{stem}.jpg"] = e
            files[f"{stem}.txt"] = f"{yes}{SUFFIX}\tYes\n{no}{SUFFIX}\tNo\n".encode()
    return files

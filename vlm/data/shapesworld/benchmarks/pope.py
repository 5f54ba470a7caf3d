"""POPE's three files (Li et al. 2023, "Evaluating Object Hallucination in Large
Vision-Language Models") for the test split.

An object is a colour+shape pair. Each image is asked about k of the objects it holds ("yes",
k = POPE's 3, fewer where the scene holds fewer) and k it does not ("no"), the absent ones
chosen three ways: random (uniform among the absent), popular (the absent objects the most test
images hold), adversarial (the absent objects that share the most test images with this
image's own). Ties go to the earlier object in colour-then-shape order. Yes and no alternate,
so every file is half yes.
"""

from __future__ import annotations

import json
import random
from collections import Counter

from ..writers import ImageEntry

K = 3
SETTINGS = ("random", "popular", "adversarial")
Obj = tuple[str, str]  # (colour, shape)


def pope_files(
    entries: list[ImageEntry], colors: list[str], shapes: list[str], seed: int
) -> dict[str, bytes | ImageEntry]:
    """Paths under pope/ → file bytes, or the entry whose image goes there."""
    objects = [(c, s) for c in colors for s in shapes]
    present = {e.id: sorted({(s.color, s.shape) for s in e.scene}) for e in entries}
    images_with = Counter(o for have in present.values() for o in have)
    together = Counter((a, b) for have in present.values() for a in have for b in have if a != b)
    lines: dict[str, list[dict]] = {s: [] for s in SETTINGS}
    files: dict[str, bytes | ImageEntry] = {}
    for e in entries:
        have = present[e.id]
        absent = [o for o in objects if o not in have]
        k = min(K, len(have), len(absent))
        if not k:
            continue
        rng = random.Random(f"shapesworld:{seed}:pope:{e.id}")
        yes = rng.sample(have, k)
        no = {
            "random": rng.sample(absent, k),
            "popular": sorted(absent, key=lambda o: -images_with[o])[:k],
            "adversarial": sorted(absent, key=lambda o: -sum(together[g, o] for g in have))[:k],
        }
        image = f"COCO_val2014_{e.cocoid:012d}.jpg"
        files[f"val2014/{image}"] = e
        for setting, rows in lines.items():
            for pair in zip(yes, no[setting], strict=True):
                for (color, shape), label in zip(pair, ("yes", "no"), strict=True):
                    text = f"Is there a {color} {shape} in the image?"
                    rows.append({"question_id": len(rows) + 1, "image": image, "text": text, "label": label})
    for setting, rows in lines.items():
        files[f"coco_pope_{setting}.json"] = "".join(json.dumps(r) + "\n" for r in rows).encode()
    return files

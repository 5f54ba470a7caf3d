"""Captions, questions and referring expressions derived from a scene.

A question is only asked when its answer is unambiguous for the scene: the
colour of "the triangle" needs exactly one triangle, left/right needs two
uniquely named shapes whose horizontal extents do not overlap.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Callable

from .scene import Shape

QTYPES = ("caption", "color", "shape", "count", "position", "exists")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CAPTION_PROMPT = "Describe the image briefly."

QA = tuple[str, str]


def name(s: Shape) -> str:
    return f"{s.color} {s.shape}"


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def left_of(a: Shape, b: Shape) -> bool:
    """a is clearly left of b: a's horizontal extent ends before b's begins."""
    return a.x_range[1] < b.x_range[0]


def caption(scene: list[Shape]) -> str:
    """Full description, objects named left to right."""
    objs = [f"a {name(s)}" for s in sorted(scene, key=lambda s: s.cx)]
    if len(objs) == 1:
        return objs[0]
    if len(objs) == 2:
        return f"{objs[0]} left of {objs[1]}"
    return f"{_join(objs)} from left to right"


def captions(scene: list[Shape], rng: random.Random) -> list[str]:
    """Three paraphrases, like the several reference captions per COCO image."""
    n = len(scene)
    noun = "shape" if n == 1 else "shapes"
    listed = [f"a {name(s)}" for s in scene]
    rng.shuffle(listed)
    return [caption(scene), f"{NUMBER_WORDS[n]} {noun}: {_join(listed)}", f"{NUMBER_WORDS[n]} {noun} on a plain background"]


def _unique(scene: list[Shape], key: Callable[[Shape], object]) -> list[Shape]:
    counts = Counter(key(s) for s in scene)
    return [s for s in scene if counts[key(s)] == 1]


def ask(qtype: str, scene: list[Shape], rng: random.Random, colors: list[str], shapes: list[str]) -> QA | None:
    """One random (question, answer) of `qtype`, or None when the scene allows none."""
    if qtype == "caption":
        return CAPTION_PROMPT, caption(scene)
    if qtype == "count":
        return "How many shapes are there?", str(len(scene))
    if qtype == "color":
        pool = _unique(scene, lambda s: s.shape)
        s = rng.choice(pool) if pool else None
        return (f"What color is the {s.shape}?", s.color) if s else None
    if qtype == "shape":
        pool = _unique(scene, lambda s: s.color)
        s = rng.choice(pool) if pool else None
        return (f"What shape is the {s.color} object?", s.shape) if s else None
    if qtype == "position":
        named = _unique(scene, name)
        pairs = [(a, b) for a in named for b in named if left_of(a, b) or left_of(b, a)]
        if not pairs:
            return None
        a, b = rng.choice(pairs)
        return f"Is the {name(a)} left or right of the {name(b)}?", "left" if left_of(a, b) else "right"
    if qtype == "exists":
        present = sorted({(s.color, s.shape) for s in scene})
        absent = [(c, k) for c in colors for k in shapes if (c, k) not in present]
        pool, answer = (present, "yes") if rng.random() < 0.5 or not absent else (absent, "no")
        c, k = rng.choice(pool)
        return f"Is there a {c} {k}?", answer
    raise ValueError(f"unknown question type {qtype!r}; expected one of {QTYPES}")


def ask_many(
    scene: list[Shape], rng: random.Random, qtypes: list[str], k: int, colors: list[str], shapes: list[str]
) -> list[tuple[str, str, str]]:
    """Up to k distinct (qtype, question, answer), cycling over the types so each gets its share."""
    out: list[tuple[str, str, str]] = []
    seen: set[str] = set()
    order = list(qtypes)
    rng.shuffle(order)
    tries = 0
    while len(out) < k and order and tries < 4 * k:
        qt = order[tries % len(order)]
        tries += 1
        qa = ask(qt, scene, rng, colors, shapes)
        if qa is None:
            order.remove(qt)
        elif qa[0] not in seen:
            seen.add(qa[0])
            out.append((qt, *qa))
    return out


def referring_expressions(s: Shape, scene: list[Shape]) -> list[str]:
    """Expressions that pick out exactly `s` in the scene (refCOCO style)."""
    out = []
    if s in _unique(scene, name):
        out.append(f"the {name(s)}")
    if s in _unique(scene, lambda o: o.shape):
        out.append(f"the {s.shape}")
    if s in _unique(scene, lambda o: o.color):
        out.append(f"the {s.color} shape")
    others = [o for o in scene if o is not s]
    if others and all(left_of(s, o) for o in others):
        out.append("the leftmost shape")
    if others and all(left_of(o, s) for o in others):
        out.append("the rightmost shape")
    return out

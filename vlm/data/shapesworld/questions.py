"""Captions, questions and referring expressions derived from a scene.

A question is only asked when its answer is unambiguous for the scene: the
colour of "the triangle" needs exactly one triangle, left/right needs two
uniquely named shapes whose horizontal extents do not overlap.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable

from .scene import SHAPES, Shape

QTYPES = ("caption", "color", "shape", "count", "position", "exists", "side")
DEFAULT_QTYPES = QTYPES[:6]  # "side" is opt-in: data sets without it keep their identity
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


def side(s: Shape, size: int) -> str:
    """The half of the image that holds the shape's centre."""
    return "left" if s.cx < size / 2 else "right"


def clear_side(s: Shape, size: int) -> str | None:
    """The half of the image that holds the whole shape, or None when it straddles the middle."""
    lo, hi = s.x_range
    return "left" if hi < size / 2 else "right" if lo > size / 2 else None


def pair_caption(a: Shape, b: Shape) -> str:
    """Two objects described from ``a``: "a blue square right of a red circle" (by centre; a
    tie says "left", as the left-to-right caption always did)."""
    return f"a {name(a)} {'left' if a.cx <= b.cx else 'right'} of a {name(b)}"


def caption(scene: list[Shape]) -> str:
    """Full description, objects named left to right."""
    ordered = sorted(scene, key=lambda s: s.cx)
    if len(ordered) == 2:
        return pair_caption(*ordered)
    objs = [f"a {name(s)}" for s in ordered]
    return objs[0] if len(objs) == 1 else f"{_join(objs)} from left to right"


def captions(scene: list[Shape], rng: random.Random) -> list[str]:
    """Three paraphrases, like the several reference captions per COCO image."""
    n = len(scene)
    noun = "shape" if n == 1 else "shapes"
    listed = [f"a {name(s)}" for s in scene]
    rng.shuffle(listed)
    return [
        caption(scene),
        f"{NUMBER_WORDS[n]} {noun}: {_join(listed)}",
        f"{NUMBER_WORDS[n]} {noun} on a plain background",
    ]


def unique(scene: list[Shape], key: Callable[[Shape], object]) -> list[Shape]:
    """The shapes whose key no other shape shares: the ones "the <key>" names unambiguously."""
    counts = Counter(key(s) for s in scene)
    return [s for s in scene if counts[key(s)] == 1]


def ask(
    qtype: str, scene: list[Shape], rng: random.Random, colors: list[str], shapes: list[str], size: int
) -> QA | None:
    """One random (question, answer) of `qtype`, or None when the scene allows none; `size` is
    the image's width (the middle that `side` questions are about)."""
    asked = _ask(qtype, scene, rng, colors, shapes, size)
    return asked[:2] if asked else None


def _ask(
    qtype: str, scene: list[Shape], rng: random.Random, colors: list[str], shapes: list[str], size: int
) -> tuple[str, str, tuple] | None:
    """`ask`, plus for position questions (name of a, name of b, a is left of b); else ()."""
    if qtype == "caption":
        return CAPTION_PROMPT, caption(scene), ()
    if qtype == "count":
        return "How many shapes are there?", str(len(scene)), ()
    if qtype == "color":
        pool = unique(scene, lambda s: s.shape)
        s = rng.choice(pool) if pool else None
        return (f"What color is the {s.shape}?", s.color, ()) if s else None
    if qtype == "shape":
        pool = unique(scene, lambda s: s.color)
        s = rng.choice(pool) if pool else None
        return (f"What shape is the {s.color} object?", s.shape, ()) if s else None
    if qtype == "position":
        named = unique(scene, name)
        pairs = [(a, b) for a in named for b in named if left_of(a, b) or left_of(b, a)]
        if not pairs:
            return None
        a, b = rng.choice(pairs)
        a_left = left_of(a, b)
        return (
            f"Is the {name(a)} left or right of the {name(b)}?",
            "left" if a_left else "right",
            (name(a), name(b), a_left),
        )
    if qtype == "side":  # one object's half: the left/right of one shape, without a second
        pool = [(s, half) for s in unique(scene, name) if (half := clear_side(s, size))]
        if not pool:
            return None
        s, half = rng.choice(pool)
        return f"Is the {name(s)} on the left or the right?", half, ()
    if qtype == "exists":
        present = sorted({(s.color, s.shape) for s in scene})
        absent = [(c, k) for c in colors for k in shapes if (c, k) not in present]
        pool, answer = (present, "yes") if rng.random() < 0.5 or not absent else (absent, "no")
        c, k = rng.choice(pool)
        return f"Is there a {c} {k}?", answer, ()
    raise ValueError(f"unknown question type {qtype!r}; expected one of {QTYPES}")


def _closure(left: set[tuple[str, str]]) -> set[tuple[str, str]]:
    """Transitive closure of a left-of relation given as (a, b) pairs: a is left of b."""
    while new := {(a, c) for a, b in left for b2, c in left if b == b2} - left:
        left = left | new
    return left


def ask_many(
    scene: list[Shape],
    rng: random.Random,
    qtypes: list[str],
    k: int,
    colors: list[str],
    shapes: list[str],
    size: int,
    conversation: bool = True,
) -> list[tuple[str, str, str]]:
    """Up to k distinct (qtype, question, answer), cycling over the types so each gets its share.

    With `conversation` (the questions become the turns of one conversation) no position
    question is asked whose answer follows from the earlier ones: "Is B left or right of A?"
    after "Is A left or right of B?", or after A-C and C-B. Otherwise the answer can be copied
    (inverted) from the text, and a model trained on such conversations learns to ignore the
    image for left/right. (Colour, shape and exists turns that follow from earlier ones are
    kept: filtering them halves the colour and shape questions and leaves exists 83% "no".)
    """
    out: list[tuple[str, str, str]] = []
    seen: set[str] = set()
    left: set[tuple[str, str]] = set()  # (a, b): the conversation so far says a is left of b
    order = list(qtypes)
    rng.shuffle(order)
    tries = 0
    while len(out) < k and order and tries < 4 * k:
        qt = order[tries % len(order)]
        tries += 1
        asked = _ask(qt, scene, rng, colors, shapes, size)
        if asked is None:
            order.remove(qt)
            continue
        q, a, facts = asked
        if q in seen:
            continue
        if qt == "position" and conversation:
            pair = facts[:2] if facts[2] else facts[1::-1]
            if pair in left or pair[::-1] in left:
                continue
            left = _closure(left | {pair})
        seen.add(q)
        out.append((qt, q, a))
    return out


REF_TYPES = ("attribute", "spatial", "reasoning")  # what a referring expression asks of a model
CORNERS = {"circle": 0}  # other shapes: as many corners as sides
AREA_MARGIN = 1.2  # "largest"/"smallest" only when it beats the runner-up by 20%


def _corners(s: Shape) -> int:
    return CORNERS.get(s.shape, SHAPES[s.shape][0])


def _extreme(s: Shape, scene: list[Shape], key: Callable[[Shape], float], margin: float = 1.0) -> bool:
    """s alone has the largest key, ahead of every other shape by the factor `margin`."""
    others = [key(o) for o in scene if o is not s]
    return bool(others) and key(s) > margin * max(others)


def referring_expressions(s: Shape, scene: list[Shape]) -> list[tuple[str, str]]:
    """(type, expression) pairs that each pick out exactly `s` in the scene (refCOCO style).

    attribute: its name, shape or colour where unique. spatial: leftmost/rightmost, or "the
    shape left of <anchor>" where s is the only shape whose centre lies left of a uniquely
    named anchor and it is clearly left of it. reasoning: most/fewest corners (a circle has
    none), largest/smallest by a clear margin of area."""
    out = []
    if s in unique(scene, name):
        out.append(("attribute", f"the {name(s)}"))
    if s in unique(scene, lambda o: o.shape):
        out.append(("attribute", f"the {s.shape}"))
    if s in unique(scene, lambda o: o.color):
        out.append(("attribute", f"the {s.color} shape"))
    others = [o for o in scene if o is not s]
    if others and all(left_of(s, o) for o in others):
        out.append(("spatial", "the leftmost shape"))
    if others and all(left_of(o, s) for o in others):
        out.append(("spatial", "the rightmost shape"))
    for anchor in unique(scene, name):
        rest = [o for o in scene if o is not anchor]
        if [o for o in rest if o.cx < anchor.cx] == [s] and left_of(s, anchor):
            out.append(("spatial", f"the shape left of the {name(anchor)}"))
        if [o for o in rest if o.cx > anchor.cx] == [s] and left_of(anchor, s):
            out.append(("spatial", f"the shape right of the {name(anchor)}"))
    if _extreme(s, scene, _corners):
        out.append(("reasoning", "the shape with the most corners"))
    if _extreme(s, scene, lambda o: -_corners(o)):
        out.append(("reasoning", "the shape with the fewest corners"))
    if _extreme(s, scene, lambda o: o.area, AREA_MARGIN):
        out.append(("reasoning", "the largest shape"))
    if _extreme(s, scene, lambda o: 1 / o.area, AREA_MARGIN):
        out.append(("reasoning", "the smallest shape"))
    return out

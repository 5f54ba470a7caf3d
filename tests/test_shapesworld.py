"""ShapesWorld: determinism, answers re-derived from the stored scenes, formats, idempotence."""

from __future__ import annotations

import json
import random
import re
import threading
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from vlm.data.seg_readers import load_refs
from vlm.data.shapesworld import ShapesWorldConfig, generate
from vlm.data.shapesworld.scene import BACKGROUND, COLORS

WORLD = dict(seed=3, image_size=48, num_train=40, num_val=10, num_test=120, questions_per_image=6)


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


@pytest.fixture(scope="module")
def scenes(world) -> dict[str, list[dict]]:
    return scene_objects(world)


def scene_objects(world: Path) -> dict[str, list[dict]]:
    """image path (relative to root) -> its objects, rebuilt from refs/instances.json."""
    inst = json.loads((world / "refs" / "instances.json").read_text())
    cats = {c["id"]: c["name"] for c in inst["categories"]}
    by_id = {im["id"]: [] for im in inst["images"]}
    for a in inst["annotations"]:
        x, y, w, h = a["bbox"]
        by_id[a["image_id"]].append(
            {"color": a["color"], "shape": cats[a["category_id"]], "x0": x, "x1": x + w, "ann": a}
        )
    return {f"images/{im['file_name']}": by_id[im["id"]] for im in inst["images"]}


def _expected(question: str, objs: list[dict]) -> str | None:
    """The answer re-derived from the objects; None where the question is ambiguous."""
    one = lambda key, v: [o for o in objs if o[key] == v]  # noqa: E731
    if m := re.fullmatch(r"What color is the (\w+)\?", question):
        hits = one("shape", m[1])
        return hits[0]["color"] if len(hits) == 1 else None
    if m := re.fullmatch(r"What shape is the (\w+) object\?", question):
        hits = one("color", m[1])
        return hits[0]["shape"] if len(hits) == 1 else None
    if question == "How many shapes are there?":
        return str(len(objs))
    if m := re.fullmatch(r"Is the (\w+) (\w+) left or right of the (\w+) (\w+)\?", question):
        a = [o for o in objs if (o["color"], o["shape"]) == (m[1], m[2])]
        b = [o for o in objs if (o["color"], o["shape"]) == (m[3], m[4])]
        if len(a) != 1 or len(b) != 1:
            return None
        a, b = a[0], b[0]
        return "left" if a["x1"] < b["x0"] else "right" if b["x1"] < a["x0"] else None
    if m := re.fullmatch(r"Is the (\w+) (\w+) on the left or the right\?", question):
        a = [o for o in objs if (o["color"], o["shape"]) == (m[1], m[2])]
        mid = WORLD["image_size"] / 2
        return None if len(a) != 1 else "left" if a[0]["x1"] < mid else "right" if a[0]["x0"] > mid else None
    if m := re.fullmatch(r"Is there a (\w+) (\w+)\?", question):
        return "yes" if any((o["color"], o["shape"]) == (m[1], m[2]) for o in objs) else "no"
    if question == "Describe the image briefly.":
        names = [f"{o['color']} {o['shape']}" for o in sorted(objs, key=lambda o: o["x0"] + o["x1"])]
        return {1: "a {}", 2: "a {} left of a {}"}.get(
            len(names), ", ".join(["a {}"] * (len(names) - 1)) + " and a {} from left to right"
        ).format(*names)
    raise AssertionError(f"unexpected question {question!r}")


def test_same_seed_same_bytes_other_seed_other_images(world, tmp_path):
    again = generate(ShapesWorldConfig(root=str(tmp_path / "a"), **WORLD))
    assert _files(again) == _files(world)
    other = generate(ShapesWorldConfig(root=str(tmp_path / "b"), **{**WORLD, "seed": 4}))
    png = "images/train/train_000000.png"
    assert (other / png).read_bytes() != (world / png).read_bytes()


def test_every_answer_matches_its_scene(world, scenes):
    n = 0
    for split in ("train", "val", "test"):
        for rec in json.loads((world / f"llava_{split}.json").read_text()):
            conv, objs = rec["conversations"], scenes[rec["image"]]
            assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
            assert conv[0]["value"].startswith("<image>\n")
            assert not any("<image>" in t["value"] for t in conv[1:])
            for h, g in zip(conv[::2], conv[1::2], strict=True):
                assert _expected(h["value"].removeprefix("<image>\n"), objs) == g["value"], (rec["id"], h, g)
                n += 1
    assert n > 500


def test_pixels_show_the_stored_scene(world, scenes):
    for path, objs in list(scenes.items())[:30]:
        img = Image.open(world / path)
        assert img.mode == "RGB" and img.size == (48, 48)
        for o in objs:
            xy = o["ann"]["segmentation"][0]
            cx, cy = sum(xy[0::2]) / len(xy[0::2]), sum(xy[1::2]) / len(xy[1::2])  # inside a convex polygon
            assert img.getpixel((int(cx), int(cy))) == COLORS[o["color"]]


def test_eval_splits_one_question_per_record_and_balanced_answers(world):
    test = json.loads((world / "llava_test.json").read_text())
    assert all(len(r["conversations"]) == 2 for r in test)
    by_type = Counter(r["qtype"] for r in test)
    assert set(by_type) == {"caption", "color", "shape", "count", "position", "exists"}
    exists = [r["conversations"][1]["value"] for r in test if r["qtype"] == "exists"]
    assert 0.4 <= exists.count("yes") / len(exists) <= 0.6
    pos = [r["conversations"][1]["value"] for r in test if r["qtype"] == "position"]
    assert 0.3 <= pos.count("left") / len(pos) <= 0.7
    counts = Counter(r["conversations"][1]["value"] for r in test if r["qtype"] == "count")
    assert set(counts) == {"1", "2", "3", "4"} and min(counts.values()) >= 15


def test_side_questions_are_opt_in_and_match_the_scene(world, tmp_path):
    """``side`` asks one shape's half ("Is the red circle on the left or the right?"), only of a
    shape that lies wholly in one half; the default question types leave it out."""
    assert "side" not in {r["qtype"] for r in json.loads((world / "llava_test.json").read_text())}
    qtypes = ("color", "shape", "count", "position", "exists", "side")
    root = generate(ShapesWorldConfig(root=str(tmp_path), **WORLD, qtypes=qtypes))
    scene = scene_objects(root)
    answers = []
    for split in ("train", "test"):
        for rec in json.loads((root / f"llava_{split}.json").read_text()):
            conv = rec["conversations"]
            for h, g in zip(conv[::2], conv[1::2], strict=True):
                q = h["value"].removeprefix("<image>\n")
                if "on the left or the right" in q:
                    assert _expected(q, scene[rec["image"]]) == g["value"], (rec["id"], q, g)
                    answers.append(g["value"])
    assert len(answers) > 50 and 0.3 <= answers.count("left") / len(answers) <= 0.7


def test_train_turns_give_a_type_more_turns_and_leave_eval_splits_alone(world, tmp_path):
    root = generate(ShapesWorldConfig(root=str(tmp_path), **WORLD, train_turns={"position": 3}))

    def position_turns(r: Path) -> int:
        train = json.loads((r / "llava_train.json").read_text())
        return sum(rec["qtypes"].count("position") for rec in train)

    assert position_turns(root) > 1.2 * position_turns(world)
    for split in ("val", "test"):
        assert (root / f"llava_{split}.json").read_bytes() == (world / f"llava_{split}.json").read_bytes()
    with pytest.raises(ValueError, match=r"train_turns names types that are not asked: \['side'\]"):
        ShapesWorldConfig(train_turns={"side": 2})


def test_single_turn_train_records(tmp_path):
    root = generate(
        ShapesWorldConfig(root=str(tmp_path), **{**WORLD, "multi_turn": False, "questions_per_image": 3})
    )
    train = json.loads((root / "llava_train.json").read_text())
    assert all(len(r["conversations"]) == 2 and r["qtype"] == r["qtypes"][0] for r in train)
    assert len(train) == 3 * WORLD["num_train"]


POSITION_Q = re.compile(r"Is the (\w+ \w+) left or right of the (\w+ \w+)\?")


def _left_pairs(turns: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """(a, b) with a left of b, for each position turn (question, answer) in order."""
    out = []
    for q, a in turns:
        if m := POSITION_Q.search(q):
            out.append((m[1], m[2]) if a == "left" else (m[2], m[1]))
    return out


def test_no_turn_answered_by_earlier_turns(world):
    """A conversation never asks a pair of shapes left/right in both orders, nor a pair whose
    order follows by transitivity from earlier turns: the answer could be read off the text."""
    from vlm.data.shapesworld.questions import _closure, ask_many
    from vlm.data.shapesworld.scene import sample_scene

    colors, shapes = ["red", "green", "blue", "yellow", "purple"], ["circle", "square", "triangle"]
    convs = []
    for r in json.loads((world / "llava_train.json").read_text()):
        c = r["conversations"]
        convs.append([(c[i]["value"], c[i + 1]["value"]) for i in range(0, len(c), 2)])
    scenes = [(rng, sample_scene(rng, 48, colors, shapes, 1, 4)) for rng in map(random.Random, range(300))]
    # position-only conversations: many position turns per scene
    convs += [
        [(q, a) for _, q, a in ask_many(s, rng, ["position"], 6, colors, shapes, 48)] for rng, s in scenes
    ]
    long = 0
    for turns in convs:
        pairs = _left_pairs(turns)
        long += len(pairs) >= 2
        for j, (a, b) in enumerate(pairs):
            known = _closure(set(pairs[:j]))
            assert (a, b) not in known and (b, a) not in known, turns
    assert long >= 50
    # single-turn records (conversation=False) are not filtered: both orders of a pair do occur
    single = [
        _left_pairs([(q, a) for _, q, a in ask_many(s, rng, ["position"], 6, colors, shapes, 48, False)])
        for rng, s in scenes
    ]
    assert any(len(set(p)) < len(p) for p in single)  # the same pair, asked in the other order


def test_caption_formats(world):
    pre = json.loads((world / "llava_pretrain.json").read_text())
    assert len(pre) == WORLD["num_train"] and pre[0]["conversations"][0] == {
        "from": "human",
        "value": "<image>",
    }
    for split, n in (("train", 40), ("val", 10), ("test", 120)):
        coco = json.loads((world / "annotations" / f"captions_{split}.json").read_text())
        ids = {im["id"] for im in coco["images"]}
        assert len(ids) == n and all(a["image_id"] in ids and a["caption"] for a in coco["annotations"])
        assert all((world / "images" / im["file_name"]).is_file() for im in coco["images"])
    karpathy = json.loads((world / "dataset_coco.json").read_text())["images"]
    assert Counter(im["split"] for im in karpathy) == {"train": 40, "val": 10, "test": 120}
    im = karpathy[0]
    assert (world / "images" / im["filepath"] / im["filename"]).is_file()
    assert all(s["tokens"] and s["raw"] for s in im["sentences"])


def test_refs_masks_and_unique_expressions(world, scenes):
    inst = json.loads((world / "refs" / "instances.json").read_text())
    anns = {a["id"]: a for a in inst["annotations"]}
    for a in anns.values():
        x, y, w, h = a["bbox"]
        xy = a["segmentation"][0]
        assert a["area"] > 0 and w > 0 and h > 0 and 0 <= x and x + w <= 48 and 0 <= y and y + h <= 48
        assert all(x - 1e-6 <= px <= x + w + 1e-6 for px in xy[0::2]) and all(
            y - 1e-6 <= py <= y + h + 1e-6 for py in xy[1::2]
        )
    refs = load_refs(world / "refs" / "refs(shapes).p")
    image_of = {im["id"]: f"images/{im['file_name']}" for im in inst["images"]}
    assert refs
    for ref in refs:
        objs = scenes[image_of[ref["image_id"]]]
        for s in ref["sentences"]:
            words = s["sent"].split()
            if s["type"] == "reasoning" or len(words) > 3:  # sizes, corners, relations: test_seg_data.py
                continue
            if words[1] in ("leftmost", "rightmost"):
                key = (lambda o: o["x0"]) if words[1] == "leftmost" else (lambda o: -o["x1"])
                hits = [min(objs, key=key)]
            else:
                hits = [o for o in objs if all(w in (o["color"], o["shape"], "shape", "the") for w in words)]
            assert [o["ann"]["id"] for o in hits] == [ref["ann_id"]], s["sent"]


def test_idempotent_and_regenerates_on_new_config(tmp_path):
    cfg = ShapesWorldConfig(root=str(tmp_path), **WORLD)
    generate(cfg)
    manifest = tmp_path / "manifest.json"
    stamp = manifest.stat().st_mtime_ns
    generate(cfg)
    assert manifest.stat().st_mtime_ns == stamp
    generate(ShapesWorldConfig(root=str(tmp_path), **{**WORLD, "num_train": 20}))
    assert json.loads(manifest.read_text())["config"]["num_train"] == 20
    assert len(list((tmp_path / "images" / "train").glob("*.png"))) == 20
    assert len(json.loads((tmp_path / "llava_pretrain.json").read_text())) == 20


def test_concurrent_generators_leave_complete_files(world, tmp_path):
    cfg = ShapesWorldConfig(root=str(tmp_path), **WORLD)
    threads = [threading.Thread(target=generate, args=(cfg,)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert _files(tmp_path) == _files(world)
    assert not list(tmp_path.rglob("*.tmp"))


def test_pretrain_questions_ask_about_the_caption_scenes(tmp_path):
    pairs = {"num_pretrain": 60, "pretrain_max_shapes": 2, "pretrain_qtypes": ("position",)}
    cfg = ShapesWorldConfig(root=str(tmp_path), **{**WORLD, **pairs})
    records = json.loads((generate(cfg) / "llava_pretrain.json").read_text())
    captions = {r["image"]: r["conversations"][1]["value"] for r in records if r["qtype"] == "caption"}
    asked = [r for r in records if r["qtype"] == "position"]
    assert len(captions) == 60 and 5 <= len(asked) < 60  # two-object scenes with a clear left/right
    for r in asked:
        left, right = re.fullmatch(r"a (\w+ \w+) left of a (\w+ \w+)", captions[r["image"]]).groups()
        question = r["conversations"][0]["value"]
        a, b = re.fullmatch(r"<image>\nIs the (\w+ \w+) left or right of the (\w+ \w+)\?", question).groups()
        assert {a, b} == {left, right}
        assert r["conversations"][1]["value"] == ("left" if a == left else "right")
    with pytest.raises(ValueError, match="unknown colours/shapes/question types \\['size'\\]"):
        ShapesWorldConfig(pretrain_qtypes=("size",))


def test_pretrain_captions_can_name_the_half_of_a_single_object(tmp_path):
    root = generate(
        ShapesWorldConfig(root=str(tmp_path), **{**WORLD, "num_pretrain": 30, "pretrain_caption_side": True})
    )
    halves = []  # pretrain scenes are not in refs/instances.json: find the object in the pixels
    for r in json.loads((root / "llava_pretrain.json").read_text()):
        half = re.fullmatch(r"a \w+ \w+ on the (left|right)", r["conversations"][1]["value"]).group(1)
        im = Image.open(root / r["image"]).convert("RGB")
        xs = [x for x in range(im.width) for y in range(im.height) if im.getpixel((x, y)) != BACKGROUND]
        offset = sum(xs) / len(xs) + 0.5 - im.width / 2  # pixel centres sit at x + 0.5
        if abs(offset) > 1:  # rasterising moves a centroid by under a pixel
            halves.append((offset < 0, half == "left"))
    assert len(halves) >= 20 and {is_left for is_left, _ in halves} == {True, False}
    assert all(is_left == said_left for is_left, said_left in halves)


def test_pretrain_pairs_can_be_described_from_either_object(tmp_path):
    pairs = {**WORLD, "num_pretrain": 60, "pretrain_max_shapes": 2}

    def pretrain_captions(folder, **extra):
        cfg = ShapesWorldConfig(root=str(tmp_path / folder), **pairs, **extra)
        return {
            r["image"]: r["conversations"][1]["value"]
            for r in json.loads((generate(cfg) / "llava_pretrain.json").read_text())
        }

    fixed, mixed = pretrain_captions("fixed"), pretrain_captions("mixed", pretrain_pair_order="random")
    assert fixed.keys() == mixed.keys()
    flipped = 0
    for image, text in fixed.items():
        if not (m := re.fullmatch(r"a (\w+ \w+) left of a (\w+ \w+)", text)):
            assert mixed[image] == text  # one-object captions are unchanged
            continue
        left, right = m.groups()
        assert mixed[image] in (text, f"a {right} right of a {left}")
        flipped += mixed[image] != text
    two = sum(" of a " in t for t in fixed.values())
    assert two >= 20 and 0.25 * two < flipped < 0.75 * two
    with pytest.raises(ValueError, match="pretrain_pair_order='shuffled': choose from left_to_right, random"):
        ShapesWorldConfig(pretrain_pair_order="shuffled")

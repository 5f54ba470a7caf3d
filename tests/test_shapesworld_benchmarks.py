"""ShapesWorld's test split as VQAv2, GQA, POPE and MME files: the published structures, the
same questions as llava_test.json, and every answer re-derived from the generator's scene data
(refs/instances.json), not from the benchmark files themselves."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image, ImageChops

from vlm.data.shapesworld import BENCHMARKS, ShapesWorldConfig, benchmark_root, generate

WORLD = dict(seed=5, image_size=48, num_train=4, num_val=2, num_test=80)
SUFFIX = " Please answer yes or no."


def _json(path: Path):
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def scenes(world) -> dict[int, list[dict]]:
    """Test image id (COCO id) -> its objects (colour, shape, horizontal extent)."""
    inst = _json(world / "refs" / "instances.json")
    cats = {c["id"]: c["name"] for c in inst["categories"]}
    out: dict[int, list[dict]] = {
        im["id"]: [] for im in inst["images"] if im["file_name"].startswith("test/")
    }
    for a in inst["annotations"]:
        if a["image_id"] in out:
            x, _, w, _ = a["bbox"]
            out[a["image_id"]].append(
                {"color": a["color"], "shape": cats[a["category_id"]], "x0": x, "x1": x + w}
            )
    return out


def _png(world: Path, image_id: int) -> Path:
    return world / "images" / "test" / f"test_{image_id % 10**7:06d}.png"


def _shows(jpeg: Path, png: Path) -> bool:
    """The JPEG is the PNG's scene: no pixel off by more than JPEG q95 4:4:4 moves it (another scene
    differs by ~200 where a shape is)."""
    a, b = Image.open(jpeg), Image.open(png)
    assert a.format == "JPEG" and a.size == b.size == (48, 48)
    return max(hi for _, hi in ImageChops.difference(a.convert("RGB"), b).getextrema()) <= 40


def _objects(objs: list[dict]) -> set[tuple[str, str]]:
    return {(o["color"], o["shape"]) for o in objs}


def _llava_test(world: Path) -> list[tuple[int, str, str]]:
    """(image id, question, answer) of llava_test.json's VQA records (captions are no VQA)."""
    ids = {f"images/{im['file_name']}": im["id"] for im in _json(world / "refs" / "instances.json")["images"]}
    return [
        (
            ids[r["image"]],
            r["conversations"][0]["value"].removeprefix("<image>\n"),
            r["conversations"][1]["value"],
        )
        for r in _json(world / "llava_test.json")
        if r["qtype"] != "caption"
    ]


def test_benchmark_folders(world):
    root = benchmark_root(world)
    assert root == world / "benchmarks" and sorted(p.name for p in root.iterdir()) == sorted(BENCHMARKS)
    assert not list(root.rglob("*.tmp"))


def test_vqav2_files_as_published_with_the_llava_test_questions(world, scenes):
    folder = benchmark_root(world) / "vqav2"
    qs = _json(folder / "v2_OpenEnded_mscoco_shapes_questions.json")
    anns = _json(folder / "v2_mscoco_shapes_annotations.json")
    assert set(qs) == {"info", "task_type", "data_type", "license", "data_subtype", "questions"}
    assert (qs["task_type"], qs["data_type"], qs["data_subtype"]) == ("Open-Ended", "mscoco", "shapes")
    assert {"info", "license", "data_subtype", "annotations"} <= set(anns)
    assert anns["data_subtype"] == "shapes"
    assert all(set(q) == {"image_id", "question", "question_id"} for q in qs["questions"])
    assert all(isinstance(q["image_id"], int) and isinstance(q["question_id"], int) for q in qs["questions"])
    ids = [q["question_id"] for q in qs["questions"]]
    assert len(set(ids)) == len(ids) and [a["question_id"] for a in anns["annotations"]] == ids

    assert [
        (q["image_id"], q["question"], a["multiple_choice_answer"])
        for q, a in zip(qs["questions"], anns["annotations"], strict=True)
    ] == _llava_test(world)

    types = {  # ShapesWorld type -> VQAv2's (question type, answer type)
        "color": ("what color is the", "other"),
        "shape": ("what", "other"),
        "count": ("how many", "number"),
        "position": ("is the", "other"),
        "exists": ("is there a", "yes/no"),
    }
    for q, a in zip(qs["questions"], anns["annotations"], strict=True):
        assert a["image_id"] == q["image_id"] and a["image_id"] in scenes
        assert (a["question_type"], a["answer_type"]) == types[a["shapes_qtype"]]
        assert q["question"].lower().startswith(a["question_type"])
        assert a["answers"] == [
            {"answer": a["multiple_choice_answer"], "answer_confidence": "yes", "answer_id": i}
            for i in range(1, 11)
        ]
    image_ids = {q["image_id"] for q in qs["questions"]}
    assert image_ids == set(scenes)
    for i in image_ids:
        assert _shows(folder / "shapes" / f"COCO_shapes_{i:012d}.jpg", _png(world, i))
    assert not _shows(
        folder / "shapes" / f"COCO_shapes_{min(image_ids):012d}.jpg", _png(world, max(image_ids))
    )


def test_gqa_balanced_questions_as_published(world):
    folder = benchmark_root(world) / "gqa"
    gqa = _json(folder / "shapes_balanced_questions.json")
    anns = _json(benchmark_root(world) / "vqav2" / "v2_mscoco_shapes_annotations.json")["annotations"]
    assert list(gqa) == [str(a["question_id"]) for a in anns]
    semantic = {"rel", "attr", "obj", "cat", "global"}
    for a in anns:
        g = gqa[str(a["question_id"])]
        assert {"imageId", "question", "answer", "fullAnswer", "isBalanced", "types"} <= set(g)
        assert g["imageId"] == str(a["image_id"]) and g["answer"] == a["multiple_choice_answer"]
        assert g["isBalanced"] is True and g["types"]["detailed"] == a["shapes_qtype"]
        assert g["types"]["structural"] in {"verify", "query", "choose", "logical", "compare"}
        assert g["types"]["semantic"] in semantic
        structural = {"exists": "verify", "position": "choose"}.get(a["shapes_qtype"], "query")
        assert g["types"]["structural"] == structural
        full = g["fullAnswer"]
        assert full.endswith(".") and (
            full.startswith(f"{g['answer'].capitalize()}, ")
            if g["answer"] in ("yes", "no")
            else g["answer"] in full
        ), full
        assert _shows(folder / "images" / f"{g['imageId']}.jpg", _png(world, a["image_id"]))
    questions = _json(benchmark_root(world) / "vqav2" / "v2_OpenEnded_mscoco_shapes_questions.json")[
        "questions"
    ]
    assert [g["question"] for g in gqa.values()] == [q["question"] for q in questions]


POPE_Q = re.compile(r"Is there a (\w+) (\w+) in the image\?")


@pytest.fixture(scope="module")
def pope(world) -> dict[str, list[dict]]:
    folder = benchmark_root(world) / "pope"
    return {
        s: [json.loads(line) for line in (folder / f"coco_pope_{s}.json").read_text().splitlines()]
        for s in ("random", "popular", "adversarial")
    }


def _asked(rows: list[dict]) -> dict[int, dict[str, list[tuple[str, str]]]]:
    """image id -> label -> the objects asked about."""
    out: dict[int, dict[str, list]] = {}
    for r in rows:
        image_id = int(re.fullmatch(r"COCO_val2014_(\d{12})\.jpg", r["image"])[1])
        out.setdefault(image_id, {"yes": [], "no": []})[r["label"]].append(
            POPE_Q.fullmatch(r["text"]).groups()
        )
    return out


def test_pope_files_balanced_and_true_to_the_scenes(world, scenes, pope):
    folder = benchmark_root(world) / "pope"
    for rows in pope.values():
        assert all(set(r) == {"question_id", "image", "text", "label"} for r in rows)
        assert [r["question_id"] for r in rows] == list(range(1, len(rows) + 1))
        assert Counter(r["label"] for r in rows) == {"yes": len(rows) // 2, "no": len(rows) // 2}
        asked = _asked(rows)
        assert set(asked) == set(scenes)
        for image_id, by_label in asked.items():
            have = _objects(scenes[image_id])
            k = min(3, len(have))
            assert len(by_label["yes"]) == len(set(by_label["yes"])) == k
            assert len(by_label["no"]) == len(set(by_label["no"])) == k
            assert all(o in have for o in by_label["yes"]) and not any(o in have for o in by_label["no"])
    assert _asked(pope["random"]).keys() == _asked(pope["popular"]).keys()
    yes = [{i: sorted(b["yes"]) for i, b in _asked(rows).items()} for rows in pope.values()]
    assert yes[0] == yes[1] == yes[2]  # POPE asks the same present objects in each setting
    image = pope["random"][0]["image"]
    assert _shows(folder / "val2014" / image, _png(world, int(image[13:25])))


def test_pope_negatives_follow_their_definitions(scenes, pope):
    """popular: no absent object held by more test images than a chosen one; adversarial: none
    co-occurring more often with the image's own objects. Random is uniform: it breaks both."""
    objects = [
        (c, s) for c in ("red", "green", "blue", "yellow", "purple") for s in ("circle", "square", "triangle")
    ]
    sets = [_objects(objs) for objs in scenes.values()]
    freq = {o: sum(o in s for s in sets) for o in objects}

    def co(o, have):
        return sum(len(have & s) for s in sets if o in s)  # sum over g in `have` of images holding g and o

    def follows(setting: str, score) -> list[bool]:
        out = []
        for image_id, by_label in _asked(pope[setting]).items():
            have = _objects(scenes[image_id])
            chosen = set(by_label["no"])
            rest = [o for o in objects if o not in have and o not in chosen]
            out.append(not rest or min(score(o, have) for o in chosen) >= max(score(o, have) for o in rest))
        return out

    popular, adversarial = (lambda o, have: freq[o]), co
    assert all(follows("popular", popular)) and all(follows("adversarial", adversarial))
    assert not all(follows("random", popular)) and not all(follows("random", adversarial))
    assert not all(follows("popular", adversarial))  # the two rankings are not the same


MME_RULES = {
    "existence": re.compile(r"Is there a (?P<color>\w+) (?P<shape>\w+) in this image\?"),
    "count": re.compile(r"(Is|Are) there (?P<n>\d+) shapes? in this image\?"),
    "position": re.compile(r"Is the (?P<a>\w+ \w+) on the (?P<rel>left|right) of the (?P<b>\w+ \w+)\?"),
    "color": re.compile(r"Is the (?P<shape>\w+) (?P<color>\w+)\?"),
}


def _true(task: str, question: str, objs: list[dict]) -> bool:
    """Whether the MME statement holds of the scene (position/colour name one object each)."""
    m = MME_RULES[task].fullmatch(question.removesuffix(SUFFIX))
    assert m and question.endswith(SUFFIX), question
    if task == "existence":
        return (m["color"], m["shape"]) in _objects(objs)
    if task == "count":
        return int(m["n"]) == len(objs)
    if task == "color":
        (s,) = [o for o in objs if o["shape"] == m["shape"]]
        return s["color"] == m["color"]
    (a,) = [o for o in objs if f"{o['color']} {o['shape']}" == m["a"]]
    (b,) = [o for o in objs if f"{o['color']} {o['shape']}" == m["b"]]
    assert a["x1"] < b["x0"] or b["x1"] < a["x0"]  # clearly apart
    return (a["x1"] < b["x0"]) == (m["rel"] == "left")


def test_mme_pairs_one_yes_one_no_true_to_the_scene(world, scenes):
    folder = benchmark_root(world) / "mme"
    assert sorted(p.name for p in folder.iterdir()) == ["color", "count", "existence", "position"]
    for task in MME_RULES:
        stems = {p.stem for p in (folder / task).iterdir()}
        assert {p.name for p in (folder / task).iterdir()} == {
            f"{s}.{x}" for s in stems for x in ("jpg", "txt")
        }
        assert 10 <= len(stems) <= len(scenes) and (len(stems) == len(scenes)) == (
            task in ("existence", "count")
        )
        for stem in stems:
            objs = scenes[int(stem)]
            yes, no, end = (folder / task / f"{stem}.txt").read_text().split("\n")
            (q_yes, a_yes), (q_no, a_no) = yes.split("\t"), no.split("\t")
            assert (a_yes, a_no, end) == ("Yes", "No", "")
            assert _true(task, q_yes, objs) and not _true(task, q_no, objs), (task, stem, q_yes, q_no)
        assert _shows(folder / task / f"{min(stems)}.jpg", _png(world, int(min(stems))))


def test_same_seed_same_bytes_and_the_flag(world, tmp_path):
    def files(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    again = generate(ShapesWorldConfig(root=str(tmp_path), **WORLD))
    assert files(benchmark_root(again)) == files(benchmark_root(world))
    generate(ShapesWorldConfig(root=str(tmp_path), **WORLD, benchmarks=False))  # regenerates: none left
    assert not benchmark_root(tmp_path).exists() and (tmp_path / "llava_test.json").is_file()
    other = generate(ShapesWorldConfig(root=str(tmp_path / "b"), **{**WORLD, "seed": 6}))
    pope = "pope/coco_pope_random.json"
    assert (benchmark_root(other) / pope).read_bytes() != (benchmark_root(world) / pope).read_bytes()

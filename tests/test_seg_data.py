"""Segmentation data: mask rasterisation, the refCOCO and ReasonSeg readers on files in the
published formats, ShapesWorld's typed referring expressions, and the datamodule wiring."""

from __future__ import annotations

import json
import pickle
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as coco_mask

from vlm.data.datamodule import VLMDataModule
from vlm.data.datasets import BadSampleError, ConversationDataset, SkipSample
from vlm.data.masks import IGNORE, target_masks
from vlm.data.readers import DataFormatError
from vlm.data.seg_readers import load_refs, read_reasonseg, read_refcoco
from vlm.data.shapesworld.questions import REF_TYPES, referring_expressions
from vlm.data.shapesworld.scene import BACKGROUND, COLORS, Shape, sample_scene

WORLD = dict(seed=2, image_size=32, num_train=30, num_val=6, num_test=6, questions_per_image=2)
SQUARE = [10, 10, 29, 10, 29, 29, 10, 29]  # pixel centres 10..29: a 20 x 20 block


def meta(masks: list, h: int = 40, w: int = 40, ignore: list | None = None) -> dict:
    return {"masks": masks, "ignore": ignore or [], "height": h, "width": w}


def square(x0: float, y0: float, x1: float, y1: float) -> list[float]:
    return [x0, y0, x1, y0, x1, y1, x0, y1]


# -- rasterisation ---------------------------------------------------------------------------
def test_square_polygon_area_and_squash_scaling():
    m = target_masks(meta([[SQUARE]]), 40)
    assert m.shape == (1, 40, 40) and m.dtype == torch.uint8
    assert m.sum() == 400 and m[0, 10:30, 10:30].all()
    assert abs(target_masks(meta([[SQUARE]]), 80).sum().item() - 1600) <= 80  # ~2x each side
    wide = target_masks(meta([[square(20, 10, 59, 29)]], h=40, w=80), 40)[0]  # 40 x 20 block
    rows, cols = wide.any(1).nonzero().flatten(), wide.any(0).nonzero().flatten()
    assert (rows.min(), rows.max()) == (10, 29)  # height kept
    assert 9 <= cols.min() <= 10 and 29 <= cols.max() <= 30  # width halved: 20..59 -> ~10..29
    assert abs(wide.sum().item() - 400) <= 40


def test_ignore_is_255_and_the_smaller_region_wins_as_in_lisa():
    hole = target_masks(meta([[SQUARE]], ignore=[[square(15, 15, 19, 19)]]), 40)[0]
    assert (hole[15:20, 15:20] == IGNORE).all() and (hole == 1).sum() == 400 - 25
    inside = target_masks(meta([[square(15, 15, 19, 19)]], ignore=[[SQUARE]]), 40)[0]
    assert (inside[15:20, 15:20] == 1).all() and (inside == IGNORE).sum() == 400 - 25
    tie = target_masks(meta([[SQUARE], [square(0, 0, 4, 4)]], ignore=[[SQUARE]]), 40)
    assert tie.shape == (2, 40, 40) and (tie[0] == IGNORE).sum() == 400 and (tie[0] == 1).sum() == 0
    assert (tie[1] == 1).sum() == 25 and (tie[1] == IGNORE).sum() == 400  # each target sees every ignore


def uncompressed(m: np.ndarray) -> list[int]:
    """COCO's uncompressed RLE counts: column-major runs, starting with zeros."""
    flat = m.flatten(order="F")
    edges = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
    return [0, *runs] if flat[0] else runs


def test_rle_compressed_and_uncompressed_decode_as_pycocotools_encodes():
    rng = np.random.default_rng(0)
    for n in (1, 7, 33):
        for p in (0.0, 0.1, 0.5, 1.0):
            m = (rng.random((n, n)) < p).astype(np.uint8)
            string = coco_mask.encode(np.asfortranarray(m))["counts"].decode()
            for counts in (string, uncompressed(m)):
                got = target_masks(meta([{"size": [n, n], "counts": counts}], n, n), n)[0]
                assert np.array_equal(got.numpy(), m), (n, p, counts)
    left = np.zeros((4, 8), np.uint8)
    left[:, :4] = 1  # squashed 4 x 8 -> 4 x 4: the left half stays the left half
    got = target_masks(meta([{"size": [4, 8], "counts": uncompressed(left)}], 4, 8), 4)[0]
    assert got[:, :2].all() and not got[:, 2:].any()


@pytest.mark.parametrize(
    ("seg", "detail"),
    [
        ([[1, 2, 3, 4, 5, 6, 7]], "even count of coordinates, got 7"),
        ([["1", 2, 3, 4, 5, 6]], "flat list of numbers"),
        ("a", "a polygon list or an RLE dict, not str"),
        ({"size": [20, 40], "counts": [1600]}, "RLE size"),
        ({"size": [40, 40], "counts": [1599]}, "cover 1599 pixels"),
        ({"size": [40, 40], "counts": "0`"}, "ends inside a count"),
        ({"size": [40, 40], "counts": "0~"}, "outside '0'..'o'"),
    ],
)
def test_a_malformed_mask_is_a_skip_sample(seg, detail):
    with pytest.raises(SkipSample, match=re.escape(detail)) as e:
        target_masks(meta([seg]), 16)
    assert e.value.reason == "malformed mask"


# -- refCOCO ---------------------------------------------------------------------------------
def write_refcoco(folder: Path, refs: object, split_by: str = "unc") -> None:
    """instances.json + refs(<split_by>).p as published (one image; a polygon and an RLE mask)."""
    folder.mkdir(parents=True, exist_ok=True)
    rle = {"size": [40, 60], "counts": [100, 20, 2280]}
    instances = {
        "images": [{"id": 581857, "file_name": "COCO_train2014_000000581857.jpg", "height": 40, "width": 60}],
        "annotations": [
            {"id": 7, "image_id": 581857, "category_id": 1, "segmentation": [SQUARE], "iscrowd": 0},
            {"id": 8, "image_id": 581857, "category_id": 1, "segmentation": rle, "iscrowd": 1},
        ],
        "categories": [{"id": 1, "name": "person"}],
    }
    (folder / "instances.json").write_text(json.dumps(instances))
    (folder / f"refs({split_by}).p").write_bytes(pickle.dumps(refs, protocol=2))


def ref(ref_id: int, ann_id: int, split: str, *sents: str) -> dict:
    sentences = [
        {"sent": s, "raw": s.capitalize(), "tokens": s.split(), "sent_id": 10 * ref_id + j}
        for j, s in enumerate(sents)
    ]
    return {
        "ref_id": ref_id,
        "ann_id": ann_id,
        "image_id": 581857,
        "split": split,
        "sentences": sentences,
        "sent_ids": [s["sent_id"] for s in sentences],
        "category_id": 1,
        "file_name": f"COCO_train2014_000000581857_{ann_id}.jpg",  # the annotation's, no file
    }


REFS = [ref(0, 7, "train", "man on left", "guy in red"), ref(1, 8, "testA", "woman"), ref(2, 7, "testB", "x")]


def test_read_refcoco_in_the_published_layout(tmp_path):
    write_refcoco(tmp_path, REFS)
    train = read_refcoco(tmp_path, "train")
    assert [r["id"] for r in train] == ["0_0", "0_1"]
    assert train[1] == {
        "id": "0_1",
        "image": "COCO_train2014_000000581857.jpg",  # from instances.json, not the ref's _7.jpg
        "conversations": [
            {"from": "human", "value": "<image>\nPlease segment guy in red."},
            {"from": "gpt", "value": "It is [SEG]."},
        ],
        "qtype": "refcoco",
        "masks": [[SQUARE]],
        "ignore": [],
        "height": 40,
        "width": 60,
    }
    (test_a,) = read_refcoco(tmp_path, "testA", question="Where is {expr}?", answer="[SEG].")
    assert test_a["conversations"][0]["value"] == "<image>\nWhere is woman?"
    assert target_masks(test_a, 40)[0].sum() == 20  # the RLE: 20 pixels of column 2
    with pytest.raises(DataFormatError, match=r"no split 'test'; the refs hold testA, testB, train$"):
        read_refcoco(tmp_path, "test")
    with pytest.raises(ValueError, match="exactly one"):
        read_refcoco(tmp_path, "train", answer="[SEG] and [SEG].")


def test_refs_written_by_python2_load(tmp_path):
    path = tmp_path / "refs(unc).p"  # [{"split": "testA", "sent": "man"}] with Python 2 ``str`` opcodes
    path.write_bytes(b"\x80\x02]q\x00}q\x01(U\x05splitq\x02U\x05testAq\x03U\x04sentq\x04U\x03manq\x05ua.")
    assert load_refs(path) == [{"split": "testA", "sent": "man"}]


class WritesAFile:
    """Pickles as a call to ``open(marker, "w")``: unpickling it creates the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_refs_pickle_with_code_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    write_refcoco(tmp_path, [*REFS, {"split": "train", "payload": WritesAFile(marker)}])
    with pytest.raises(DataFormatError) as e:
        read_refcoco(tmp_path, "train")
    assert str(tmp_path / "refs(unc).p") in str(e.value) and "io.open" in str(e.value)
    assert "\n" not in str(e.value) and not marker.exists()


def test_refcoco_datamodule_splits_and_missing_files(tmp_path):
    write_refcoco(tmp_path, REFS)
    splits = {"train": "train", "test": "testA"}
    dm = VLMDataModule(source="refcoco", root=str(tmp_path), splits=splits, qtypes=["refcoco"])
    dm.check_files(["train", "test"])
    dm.setup("test")
    assert [r["id"] for r in dm.datasets["test"].records] == ["1_10"] and not dm.has_split("val")
    with pytest.raises(DataFormatError, match=r"^data.split_by: .*refs\(umd\).p does not exist$"):
        VLMDataModule(source="refcoco", root=str(tmp_path), split_by="umd").check_files(["train"])
    (tmp_path / "train").mkdir()
    with pytest.raises(DataFormatError, match=r"^data.splits.val: .*val does not exist$"):
        VLMDataModule(source="reasonseg", root=str(tmp_path)).check_files(["train", "val"])


# -- ReasonSeg -------------------------------------------------------------------------------
def write_reasonseg(folder: Path) -> None:
    (folder / "val").mkdir(parents=True)
    Image.new("RGB", (60, 40), "white").save(folder / "val" / "a.jpg")
    shapes = [
        {"label": "target", "points": [[10, 10], [29, 10], [29, 29], [10, 29]], "shape_type": "polygon"},
        {"label": "ignore", "points": [[15, 15], [19, 15], [19, 19], [15, 19]], "shape_type": "polygon"},
        {"label": "flag", "points": [[0, 0], [5, 0], [5, 5]], "shape_type": "polygon"},
    ]
    text = ["What can one sit on here?", "Where would a cat sleep? "]
    (folder / "val" / "a.json").write_text(json.dumps({"text": text, "is_sentence": True, "shapes": shapes}))
    Image.new("RGB", (8, 8)).save(folder / "val" / "b.jpg")
    (folder / "val" / "b.json").write_text('{"text": ["chair"], "is_sentence": false, "shapes": [')


def test_read_reasonseg_with_target_ignore_and_a_broken_json(tmp_path):
    write_reasonseg(tmp_path)
    records = read_reasonseg(tmp_path, "val")
    a0, a1, _ = records
    assert a0["image"] == "val/a.jpg" and (a0["height"], a0["width"]) == (40, 60)
    assert (
        a1["conversations"][0]["value"]
        == "<image>\nWhere would a cat sleep? Please output the segmentation mask."
    )
    assert a0["qtype"] == "long_query" and a0["conversations"][1]["value"] == "It is [SEG]."
    assert a0["masks"] == [[SQUARE]] and a0["ignore"] == [[square(15, 15, 19, 19)]]
    m = target_masks(a0, 60)[0]  # 40 x 60 squashed to 60 x 60: rows stretched 1.5x
    assert (m == IGNORE).sum() > 0 and (m == 1).sum() > 0 and m[:, :9].eq(0).all()  # flag dropped
    ds = ConversationDataset(records, tmp_path, source="ReasonSeg val")
    assert len(ds) == 2 and ds.bad_samples == {"malformed JSON": 1}
    with pytest.raises(DataFormatError, match=r"no ReasonSeg split 'test'; .* holds \['val'\]$"):
        read_reasonseg(tmp_path, "test")


# -- ShapesWorld -----------------------------------------------------------------------------
CORNERS = {"circle": 0, "triangle": 3, "square": 4}


def referents(expr: str, scene: list[Shape]) -> list[Shape]:
    """The shapes an expression can mean, read from the scene as a person would."""
    others = lambda s: [o for o in scene if o is not s]  # noqa: E731
    if m := re.fullmatch(r"the shape (left|right) of the (\w+) (\w+)", expr):
        (anchor,) = [o for o in scene if (o.color, o.shape) == m.group(2, 3)]
        side = -1 if m[1] == "left" else 1
        hits = [o for o in others(anchor) if side * (o.cx - anchor.cx) > 0]
        clear = all(
            o.x_range[1] < anchor.x_range[0] if side < 0 else o.x_range[0] > anchor.x_range[1] for o in hits
        )
        return hits if clear else []
    if expr in ("the leftmost shape", "the rightmost shape"):
        lo = expr == "the leftmost shape"
        return [
            s
            for s in scene
            if others(s)
            and all(s.x_range[1] < o.x_range[0] if lo else s.x_range[0] > o.x_range[1] for o in others(s))
        ]
    if m := re.fullmatch(r"the shape with the (most|fewest) corners", expr):
        pick = max if m[1] == "most" else min
        best = pick(CORNERS[s.shape] for s in scene)
        return [s for s in scene if CORNERS[s.shape] == best] if len(scene) > 1 else []
    if expr in ("the largest shape", "the smallest shape"):
        big = expr == "the largest shape"
        by_area = sorted(scene, key=lambda s: s.area, reverse=big)
        if len(scene) < 2 or not (
            by_area[0].area > 1.2 * by_area[1].area if big else by_area[0].area * 1.2 < by_area[1].area
        ):
            return []
        return by_area[:1]
    words = expr.split()[1:]
    return [s for s in scene if all(w in (s.color, s.shape, "shape") for w in words)]


def test_every_shapesworld_expression_picks_out_exactly_one_shape():
    seen: dict[str, set[str]] = {t: set() for t in REF_TYPES}
    rng = random.Random(0)
    for _ in range(400):
        scene = sample_scene(rng, 64, ["red", "green", "blue"], list(CORNERS), 1, 4)
        for s in scene:
            for kind, expr in referring_expressions(s, scene):
                assert referents(expr, scene) == [s], (expr, scene)
                seen[kind].add(re.sub(r"(red|green|blue) (circle|square|triangle)", "<name>", expr))
    assert {"the <name>", "the circle", "the red shape"} <= seen["attribute"]
    relations = {"the shape left of the <name>", "the shape right of the <name>"}
    assert {"the leftmost shape", "the rightmost shape", *relations} <= seen["spatial"]
    corners = {"the shape with the most corners", "the shape with the fewest corners"}
    assert seen["reasoning"] == {"the largest shape", "the smallest shape", *corners}


def shape_color(image: Image.Image, mask: torch.Tensor) -> tuple[int, ...] | None:
    """The colour of the one shape ``mask`` covers exactly as rendered, or None: one colour,
    and no pixel of that colour next to it left out (shapes are drawn apart)."""
    pixels = torch.from_numpy(np.array(image)).long()
    colors = {tuple(pixels[y, x].tolist()) for y, x in mask.nonzero().tolist()}
    if len(colors) != 1 or colors == {BACKGROUND}:
        return None
    color = colors.pop()
    grown = mask.clone()
    grown[1:] |= mask[:-1]
    grown[:-1] |= mask[1:]
    grown[:, 1:] |= mask[:, :-1]
    grown[:, :-1] |= mask[:, 1:]
    return None if (grown & (pixels == torch.tensor(color)).all(-1) & ~mask).any() else color


def test_shapesworld_refs_through_the_datamodule_give_the_rendered_shapes(world):
    dm = VLMDataModule(root=str(world), reader="refcoco", split_by="shapes", shapesworld=WORLD)
    dm.prepare_data()
    dm.setup()
    assert {r["qtype"] for r in dm.datasets["train"].records} == set(REF_TYPES)
    for split in ("val", "test"):
        ds = dm.datasets[split]
        assert len(ds) > 0
        for k in range(len(ds)):
            sample = ds[k]
            question = sample["conversations"][0]["value"]
            color = shape_color(sample["image"], target_masks(sample["meta"], WORLD["image_size"])[0].bool())
            assert color is not None, question
            named = [c for c in COLORS if f" {c} " in question]
            if sample["meta"]["qtype"] == "attribute" and named:
                assert color == COLORS[named[0]], question


def test_max_train_samples_caps_train_only_and_is_seeded(world):
    kw = dict(root=str(world), reader="refcoco", split_by="shapes", shapesworld=WORLD, max_train_samples=7)
    dm, again, full = (
        VLMDataModule(**kw),
        VLMDataModule(**kw),
        VLMDataModule(**{**kw, "max_train_samples": None}),
    )
    for d in (dm, again, full):
        d.setup()
    ids = lambda d, s: [d.datasets[s][k]["id"] for k in range(len(d.datasets[s]))]  # noqa: E731
    assert len(dm.datasets["train"]) == 7 < len(full.datasets["train"])
    assert ids(dm, "train") == ids(again, "train") and set(ids(dm, "train")) <= set(ids(full, "train"))
    assert ids(dm, "test") == ids(full, "test")


def test_a_one_or_two_point_polygon_piece_encloses_nothing():
    """COCO holds a few such pieces beside real ones: the object keeps its other pieces."""
    got = target_masks(meta([[[1, 1, 3, 1], square(0, 0, 4, 4)]], 8, 8), 8)[0]
    assert got.sum() == target_masks(meta([[square(0, 0, 4, 4)]], 8, 8), 8)[0].sum() > 0


def test_a_malformed_mask_is_skipped_and_counted_or_raises_in_one_line(world):
    records = read_refcoco(world / "refs", "val", split_by="shapes")
    records[2] = {**records[2], "masks": [[[1, 2, 3, 4, 5]]]}
    to_masks = lambda sample: target_masks(sample["meta"], 16)  # noqa: E731
    ds = ConversationDataset(records, world / "images", "skip", transform=to_masks, source="refs")
    assert ds[2] is None and ds[1].shape == (1, 16, 16)
    assert ds.bad_samples == {"malformed mask": 1}
    strict = ConversationDataset(records, world / "images", "raise", transform=to_masks, source="refs")
    with pytest.raises(BadSampleError) as e:
        strict[2]
    assert str(e.value) == (
        f"refs record 2 (id {records[2]['id']}): malformed mask: a polygon needs an even count of "
        "coordinates, got 5"
    )

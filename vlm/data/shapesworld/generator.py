"""ShapesWorld: a seeded generator that writes LLaVA, COCO and refCOCO files to disk, and its
test split as VQAv2, GQA, POPE and MME files (benchmarks/).

The default run needs data without a network; writing the real formats means it
goes through the same readers as real data. Each image draws from its own RNG
keyed by (seed, split, index), so the val/test scenes do not change when the
train split grows.
"""

from __future__ import annotations

import fcntl
import json
import pickle
import random
import shutil
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from .benchmarks import benchmark_root, write_benchmarks
from .questions import DEFAULT_QTYPES, QTYPES, ask, ask_many, captions, pair_caption, side
from .scene import COLORS, SHAPES, render, sample_scene
from .writers import (
    ImageEntry,
    atomic_write_bytes,
    atomic_write_json,
    coco_captions,
    instances_and_refs,
    karpathy,
    png_bytes,
)

# 2: a conversation asks nothing its earlier turns answer; 3: typed refs in refs(shapes).p;
# 4: benchmarks/ (the test split as VQAv2, GQA, POPE and MME files)
VERSION = 4
SPLITS = ("train", "val", "test")
IMAGE = "<image>"
PAIR_ORDERS = ("left_to_right", "random")


@dataclass
class ShapesWorldConfig:
    """What to generate; everything but `root` identifies the data set (see manifest.json).

    `multi_turn`: a train record holds `questions_per_image` QA turns about one image
    (as LLaVA mix665k does), else each question is its own record. Val/test always
    hold one question per record, one record per eligible question type per image.
    `train_turns`: turns a type takes per round of the train questions ({position: 3}: up
    to three left/right turns where the scene has them; others 1); val/test are unchanged.
    `benchmarks`: also write the test split as the benchmarks' published files (benchmarks/).
    """

    root: str = "data/shapesworld"
    seed: int = 0
    image_size: int = 64
    num_train: int = 8000
    num_val: int = 200
    num_test: int = 1000
    min_shapes: int = 1
    max_shapes: int = 4
    colors: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple")
    shapes: tuple[str, ...] = ("circle", "square", "triangle")
    qtypes: tuple[str, ...] = DEFAULT_QTYPES
    multi_turn: bool = True
    questions_per_image: int = 6
    train_turns: dict[str, int] | None = None
    num_pretrain: int = 0
    pretrain_max_shapes: int = 1
    pretrain_qtypes: tuple[str, ...] = ()
    pretrain_caption_side: bool = False
    pretrain_pair_order: str = "left_to_right"
    benchmarks: bool = True

    def __post_init__(self) -> None:
        self.train_turns = dict(self.train_turns or {})  # null in a config: every type 1
        unknown = [c for c in self.colors if c not in COLORS] + [s for s in self.shapes if s not in SHAPES]
        unknown += [q for q in (*self.qtypes, *self.pretrain_qtypes) if q not in QTYPES]
        if unknown:
            raise ValueError(
                f"unknown colours/shapes/question types {unknown}; "
                f"known: {list(COLORS)}, {list(SHAPES)} and {list(QTYPES)}"
            )
        if not_asked := [q for q in self.train_turns if q not in self.qtypes]:
            raise ValueError(
                f"train_turns names types that are not asked: {not_asked} (qtypes: {list(self.qtypes)})"
            )
        if self.pretrain_pair_order not in PAIR_ORDERS:
            raise ValueError(
                f"pretrain_pair_order={self.pretrain_pair_order!r}: choose from {', '.join(PAIR_ORDERS)}"
            )
        if not 1 <= self.min_shapes <= self.max_shapes <= 6:
            raise ValueError(
                f"need 1 <= min_shapes <= max_shapes <= 6, got {self.min_shapes}, {self.max_shapes}"
            )

    def identity(self) -> dict:
        """The config as stored in the manifest (JSON types, no root)."""
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        d.pop("root")
        return d


def _turns(qas: list[tuple[str, str, str]]) -> list[dict]:
    conv = []
    for j, (_, q, a) in enumerate(qas):
        conv += [{"from": "human", "value": f"{IMAGE}\n{q}" if j == 0 else q}, {"from": "gpt", "value": a}]
    return conv


def _records(cfg: ShapesWorldConfig, e: ImageEntry, rng: random.Random) -> list[dict]:
    """LLaVA records for one image (see ShapesWorldConfig for the per-split layout)."""
    image, colors, shapes = f"images/{e.file_name}", list(cfg.colors), list(cfg.shapes)
    if e.split != "train":
        qas = [
            (qt, *qa) for qt in cfg.qtypes if (qa := ask(qt, e.scene, rng, colors, shapes, cfg.image_size))
        ]
        return [
            {"id": f"{e.id}_{qt}", "image": image, "conversations": _turns([(qt, q, a)]), "qtype": qt}
            for qt, q, a in qas
        ]
    qtypes = [qt for qt in cfg.qtypes for _ in range(cfg.train_turns.get(qt, 1))]
    qas = ask_many(
        e.scene, rng, qtypes, cfg.questions_per_image, colors, shapes, cfg.image_size, cfg.multi_turn
    )
    groups = [qas] if cfg.multi_turn else [[qa] for qa in qas]
    return [
        {
            "id": e.id if cfg.multi_turn else f"{e.id}_{j}",
            "image": image,
            "conversations": _turns(g),
            "qtype": g[0][0] if len(g) == 1 else "multi",
            "qtypes": [qt for qt, _, _ in g],
        }
        for j, g in enumerate(groups)
    ]


@contextmanager
def _locked(root: Path) -> Iterator[None]:
    """Serialise generators on one root (e.g. DDP ranks): the second finds the manifest and returns."""
    with open(root / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _split(
    cfg: ShapesWorldConfig, root: Path, split: str, n: int, max_shapes: int | None = None
) -> tuple[list[ImageEntry], list[dict]]:
    folder = root / "images" / split
    folder.mkdir(parents=True, exist_ok=True)
    entries, records = [], []
    top = max_shapes or cfg.max_shapes
    for i in range(n):
        rng = random.Random(f"shapesworld:{cfg.seed}:{split}:{i}")
        scene = sample_scene(
            rng, cfg.image_size, list(cfg.colors), list(cfg.shapes), min(cfg.min_shapes, top), top
        )
        e = ImageEntry(
            f"{split}_{i:06d}",
            (SPLITS + ("pretrain",)).index(split) * 10**7 + i,
            split,
            "",
            cfg.image_size,
            scene,
            [],
        )
        e.file_name = f"{split}/{e.id}.png"
        e.captions = captions(scene, rng)
        atomic_write_bytes(root / "images" / e.file_name, png_bytes(render(scene, cfg.image_size)))
        entries.append(e)
        records += _records(cfg, e, rng)
    keep = {f"{e.id}.png" for e in entries}
    for stale in folder.glob("*.png"):  # left over from a larger earlier config
        if stale.name not in keep:
            stale.unlink(missing_ok=True)
    return entries, records


def _write_pretrain(cfg: ShapesWorldConfig, root: Path, train: list[ImageEntry]) -> None:
    """llava_pretrain.json: captions for LLaVA's stage 1 (human "<image>", gpt caption).

    With ``num_pretrain`` they describe their own scenes of at most ``pretrain_max_shapes``
    objects: single-object captions tie each colour and shape word to its look before any
    question needs binding (the CPU default's curriculum); otherwise the train scenes.
    ``pretrain_qtypes`` adds one single-question record per scene and type (where the scene
    allows one), e.g. left/right on the two-object scenes, where a comparison has only one
    other object to compare with. ``pretrain_pair_order="random"`` describes a two-object
    scene from either object ("a blue square right of a red circle"), so the word after the
    first name is a left/right comparison rather than a fixed word.
    """
    entries = train
    if cfg.num_pretrain:
        entries, _ = _split(cfg, root, "pretrain", cfg.num_pretrain, cfg.pretrain_max_shapes)
    pretrain = []
    for e in entries:
        text = e.captions[0]
        if cfg.pretrain_caption_side and len(e.scene) == 1:
            text += f" on the {side(e.scene[0], cfg.image_size)}"
        if cfg.pretrain_pair_order == "random" and len(e.scene) == 2:
            text = pair_caption(
                *random.Random(f"shapesworld:{cfg.seed}:pair_order:{e.id}").sample(e.scene, 2)
            )
        pretrain.append(
            {
                "id": e.id,
                "image": f"images/{e.file_name}",
                "qtype": "caption",
                "conversations": [{"from": "human", "value": IMAGE}, {"from": "gpt", "value": text}],
            }
        )
        rng = random.Random(f"shapesworld:{cfg.seed}:pretrain_questions:{e.id}")
        for qt in cfg.pretrain_qtypes:
            if qa := ask(qt, e.scene, rng, list(cfg.colors), list(cfg.shapes), cfg.image_size):
                pretrain.append(
                    {
                        "id": f"{e.id}_{qt}",
                        "image": f"images/{e.file_name}",
                        "qtype": qt,
                        "conversations": _turns([(qt, *qa)]),
                    }
                )
    atomic_write_json(root / "llava_pretrain.json", pretrain)


def generate(cfg: ShapesWorldConfig) -> Path:
    """Write the data set under cfg.root and return it; a no-op when manifest.json matches cfg.

    manifest.json is removed first and written last, so its presence means every
    other file is complete; each file is written atomically.
    """
    root = Path(cfg.root)
    root.mkdir(parents=True, exist_ok=True)
    manifest = root / "manifest.json"
    want = {"version": VERSION, "config": cfg.identity()}
    with _locked(root):
        if manifest.exists():
            have = json.loads(manifest.read_text())
            if {k: have.get(k) for k in want} == want:
                return root
            manifest.unlink()
        for d in ("annotations", "refs"):
            (root / d).mkdir(exist_ok=True)
        all_entries, counts = [], {}
        for split in SPLITS:
            entries, records = _split(cfg, root, split, getattr(cfg, f"num_{split}"))
            all_entries += entries
            atomic_write_json(root / f"llava_{split}.json", records)
            atomic_write_json(root / "annotations" / f"captions_{split}.json", coco_captions(entries))
            qts = Counter(qt for r in records for qt in r.get("qtypes", [r["qtype"]]))
            counts[split] = {
                "images": len(entries),
                "records": len(records),
                "questions": dict(sorted(qts.items())),
            }
            if split == "train":
                _write_pretrain(cfg, root, entries)
            if split == "test":
                shutil.rmtree(benchmark_root(root), ignore_errors=True)  # nothing left from an earlier config
                if cfg.benchmarks:
                    colors, shapes = list(cfg.colors), list(cfg.shapes)
                    write_benchmarks(root, entries, records, cfg.seed, colors, shapes, cfg.max_shapes)
        atomic_write_json(root / "dataset_coco.json", karpathy(all_entries))
        instances, refs = instances_and_refs(all_entries, list(cfg.shapes))
        atomic_write_json(root / "refs" / "instances.json", instances)
        atomic_write_bytes(root / "refs" / "refs(shapes).p", pickle.dumps(refs, protocol=2))
        atomic_write_bytes(manifest, json.dumps({**want, "counts": counts}, indent=2).encode())
    return root

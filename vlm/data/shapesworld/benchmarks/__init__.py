"""ShapesWorld's test split as the files of the benchmarks papers report: VQAv2, GQA, POPE, MME.

The scorers read exactly the published layouts, so the embedded data goes through the same
scoring code as the real benchmarks. Each benchmark gets its own folder under
`benchmark_root(<dataset folder>)` with JPEG copies of the test scenes, named as it names them:

    vqav2/v2_OpenEnded_mscoco_shapes_questions.json, v2_mscoco_shapes_annotations.json,
          shapes/COCO_shapes_<image id:012d>.jpg
    gqa/shapes_balanced_questions.json, images/<imageId>.jpg
    pope/coco_pope_{random,popular,adversarial}.json, val2014/COCO_val2014_<image id:012d>.jpg
    mme/{existence,count,position,color}/<image id:012d>.{jpg,txt}
"""

from __future__ import annotations

import os
from pathlib import Path

from ..scene import render
from ..writers import ImageEntry, atomic_write_bytes, jpeg_bytes
from .gqa import gqa_files
from .mme import mme_files
from .pope import pope_files
from .vqa import SPLIT, vqa_questions, vqav2_files

BENCHMARKS = ("vqav2", "gqa", "pope", "mme")

__all__ = ["BENCHMARKS", "SPLIT", "benchmark_root", "write_benchmarks"]


def benchmark_root(dataset_folder: str | Path) -> Path:
    """The folder holding one folder per benchmark, in a ShapesWorld folder (the one with
    manifest.json): `benchmark_root(folder) / "pope"`, ...; their split is `SPLIT`."""
    return Path(dataset_folder) / "benchmarks"


def write_benchmarks(
    root: Path,
    entries: list[ImageEntry],
    records: list[dict],
    seed: int,
    colors: list[str],
    shapes: list[str],
    max_shapes: int,
) -> None:
    """Write every benchmark's files from the test split's images and LLaVA records; each image
    is encoded once and linked into every other benchmark that shows it."""
    questions = vqa_questions(entries, records)
    layout = {
        "vqav2": vqav2_files(questions),
        "gqa": gqa_files(questions),
        "pope": pope_files(entries, colors, shapes, seed),
        "mme": mme_files(entries, colors, shapes, max_shapes, seed),
    }
    written: dict[str, Path] = {}  # entry id -> the first copy of its JPEG
    for bench, files in layout.items():
        for rel, data in files.items():
            path = benchmark_root(root) / bench / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(data, ImageEntry) and data.id in written:
                _link(written[data.id], path)
                continue
            if isinstance(data, ImageEntry):
                written[data.id] = path
                data = jpeg_bytes(render(data.scene, data.size))
            atomic_write_bytes(path, data)


def _link(src: Path, dst: Path) -> None:
    """Another copy of an image: a hard link, which is complete the moment it exists and is made
    30x faster than a new file; a written copy where the file system has no hard links."""
    try:
        os.link(src, dst)
    except OSError:
        atomic_write_bytes(dst, src.read_bytes())

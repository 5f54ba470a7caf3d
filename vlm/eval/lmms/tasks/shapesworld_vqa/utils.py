"""The ShapesWorld VQA task's documents and score. Documents are the records of
``llava_test.json`` in the generated ShapesWorld folder named by ``$SHAPESWORLD_DIR`` (LLaVA
format, images relative to that folder); lmms-eval's YAML reads ``DATA_FILES`` from here, so
the folder is chosen without editing the YAML, and read offline (``dataset_path: json``)."""

import os
from pathlib import Path

from PIL import Image

from vlm.core.metrics import normalize_answer
from vlm.core.tokenizer import IMAGE_TOKEN

ENV = "SHAPESWORLD_DIR"


def data_dir() -> Path:
    """Checked when lmms-eval loads the task: one line, not a download retried on a missing file."""
    root = os.environ.get(ENV, "")
    if not root or not (Path(root) / "llava_test.json").is_file():
        raise SystemExit(
            f"shapesworld_vqa: {ENV}={root!r} is not a generated ShapesWorld folder (one with "
            "llava_test.json and images/); set it, e.g. SHAPESWORLD_DIR=data/shapesworld/llava_shapes"
        )
    return Path(root).resolve()


ROOT = data_dir()
# The YAML's `data_files: !function utils.DATA_FILES`: lmms-eval's tag takes any attribute of this file.
DATA_FILES = {"test": str(ROOT / "llava_test.json")}


def doc_to_visual(doc: dict) -> list[Image.Image]:
    return [Image.open(ROOT / doc["image"]).convert("RGB")]


def doc_to_text(doc: dict) -> str:
    """The question without its ``<image>`` mark: where the image goes is the model's choice."""
    return doc["conversations"][0]["value"].replace(IMAGE_TOKEN, "").strip()


def doc_to_target(doc: dict) -> str:
    return doc["conversations"][-1]["value"]


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    match = normalize_answer(results[0]) == normalize_answer(doc_to_target(doc))
    return {"exact_match": float(match)}

"""What ``vlm-predict input=...`` asks: a folder of images, a LLaVA JSON, or a JSONL of ``{image,
question, id?}``, read into :class:`Item` s before any model is built, so a wrong path costs
nothing. A record that cannot be asked (a malformed line, no image) stays an item that carries its
error: the output keeps one line per input."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from vlm.data.readers import BadLine, read_llava_json
from vlm.runtime.errors import ConfigError

KINDS = "a folder of images, a LLaVA JSON (.json) or a JSONL (.jsonl) of {image, question}"


@dataclass(frozen=True)
class Item:
    id: str
    image: str | None  # as the input names it (written back on its line)
    path: Path | None  # where it is read from
    question: str | None
    error: str | None = None


class BadImage(ValueError):
    """An image file that cannot be used; the message says which and why."""


def read_image(path: Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise BadImage(f"image {path} does not exist") from None
    except UnidentifiedImageError:
        raise BadImage(f"{path} is not an image (no format PIL reads)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise BadImage(f"image {path} cannot be read: {err}") from None


def image_files(folder: Path) -> list[Path]:
    """The files of ``folder`` whose suffix names a format PIL opens, sorted by name."""
    Image.init()
    suffixes = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in suffixes and p.is_file())


def first_question(turns: Any) -> str | None:
    """The first human turn of a LLaVA conversation, without its ``<image>`` placeholder."""
    human = [t["value"] for t in turns if isinstance(t, dict) and t.get("from") == "human"]
    if not human or not isinstance(human[0], str):
        return None
    return human[0].replace("<image>", "").strip()


def record_item(rec: Any, index: int, root: Path, question: str | None) -> Item:
    """A LLaVA record or a ``{image, question, id?}`` line (``question`` where it has none); its id
    defaults to its position. Images are relative to ``root`` unless absolute."""
    if isinstance(rec, BadLine):
        return Item(str(index), None, None, None, f"{rec.reason}: {rec.detail}")
    if not isinstance(rec, dict):
        return Item(str(index), None, None, None, f"a JSON {type(rec).__name__}, not a record")
    turns = rec.get("conversations")
    asked = first_question(turns) if isinstance(turns, list) else rec.get("question")
    asked = asked if isinstance(asked, str) else question
    image = rec.get("image")
    if not isinstance(image, str) or not image:
        return Item(str(rec.get("id", index)), None, None, asked, "the record names no image")
    return Item(str(rec.get("id", index)), image, root / image, asked)


def read_inputs(source: Path, question: str | None, image_folder: str | None) -> list[Item]:
    if source.is_dir():
        files = image_files(source)
        if not files:
            raise ConfigError(f"vlm-predict: input={source} holds no image files: give {KINDS}")
        return [Item(p.stem, p.name, p, question) for p in files]
    if not source.is_file():
        raise ConfigError(f"vlm-predict: input={source} does not exist: give {KINDS}")
    if source.suffix not in (".json", ".jsonl"):
        raise ConfigError(f"vlm-predict: input={source} is neither a folder nor a .json/.jsonl: give {KINDS}")
    root = Path(image_folder) if image_folder else source.parent
    return [record_item(rec, i, root, question) for i, rec in enumerate(read_llava_json(source))]

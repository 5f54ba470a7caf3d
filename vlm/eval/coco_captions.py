"""COCO captions (Chen et al. 2015) from the published annotation file, scored by the COCO
caption evaluation (BLEU-1..4, METEOR, ROUGE-L, CIDEr-D: :func:`vlm.core.caption_metrics.score_captions`).

    <root>/annotations/captions_<split>.json   {"images": [{"id", "file_name"}],
                                                "annotations": [{"image_id", "caption"}]}
    <image_folder>/<file_name>                 (default <root>/<split>)
"""

from __future__ import annotations

from vlm.core.caption_metrics import score_captions
from vlm.data.readers import DataFormatError, read_coco_captions
from vlm.eval.base import Benchmark, BenchmarkError, Item

CAPTION_PROMPT = "Provide a one-sentence caption for the provided image."  # LLaVA's, as lmms-eval asks it


class COCOCaptions(Benchmark):
    """One item per image; its question is empty and the prompt suffix asks for the caption.
    Figures are over the images scored together (CIDEr's IDF comes from their references);
    METEOR needs Java and is absent without it, and without Java the captions are tokenised by
    an approximation of the PTB tokenizer (a warning says so)."""

    name = "coco_captions"
    headline = ("cider", "bleu4")
    default_suffix = CAPTION_PROMPT

    def read(self) -> list[Item]:
        path = self.root / "annotations" / f"captions_{self.split}.json"
        if not path.is_file():
            raise BenchmarkError(f"{path}: no such file (expected the COCO {self.split} captions)")
        try:
            images = read_coco_captions(path)
        except DataFormatError as e:
            raise BenchmarkError(str(e)) from None
        except (KeyError, TypeError) as e:
            raise BenchmarkError(f"{path}: an image or caption record lacks {e}") from None
        folder = self.image_folder or self.root / self.split
        return [Item(r["id"], folder / r["image"], "", r["captions"] or None) for r in images]

    def score(self, predictions: dict[str, str]) -> dict[str, float]:
        answered = self.answered(predictions)
        return score_captions({it.id: p for it, p in answered}, {it.id: it.answer for it, p in answered})

"""What ``vlm-demo`` shows for an image, one path per kind of checkpoint (``what_it_does``): the
reply of one that answers or captions, streamed while it is generated, and the mask of one that
segments, over the image. Prompts are built as ``vlm-predict`` builds them, so the reply the
page ends with is the text ``vlm-predict`` prints for the same image and question."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import gradio as gr
import numpy as np
import torch
from lightning.pytorch.utilities import move_data_to_device
from PIL import Image
from transformers import TextIteratorStreamer

from vlm.core.lit_module import VLMLitModule
from vlm.data.datasets import SkipSample
from vlm.data.seg_readers import ANSWER
from vlm.families.qformer_captioner.analysis import patch_attention_figure
from vlm.families.sam_segmentation.overlays import spotlight


def example_images(data_config: dict | None, n: int) -> list[Path]:
    """The first ``n`` test images of the checkpoint's own ShapesWorld; none for other data."""
    if not data_config or data_config.get("source") != "shapesworld":
        return []
    return sorted((Path(data_config["root"]) / "images" / "test").glob("*.png"))[: max(n, 0)]


def opened(path: str | None) -> Image.Image:
    """The image as ``vlm-predict`` reads it (RGB)."""
    if not path:
        raise gr.Error("Upload an image or pick an example first.")
    try:
        return Image.open(path).convert("RGB")
    except OSError as err:
        raise gr.Error(f"cannot read the image: {err}") from err


def prompt_batch(module: VLMLitModule, image: Image.Image, question: str, answer: str = "", **extra) -> dict:
    """One prompt through the checkpoint's own processor, on the module's device (``extra``: the
    sample's other keys, a segmenter's ``meta``)."""
    proc = module.processor
    try:
        item = proc.encode_question(image, question, answer, **extra)
    except SkipSample as err:
        raise gr.Error(f"the question does not fit: {err}") from None
    return move_data_to_device(proc.collate_prompts([item]), module.device)


def streamed(module: VLMLitModule, batch: dict, generation: dict) -> Iterator[str]:
    """The reply as it grows, then ``module.generate``'s own text (its defaults, its decoding).
    Beam search cannot stream in transformers: its reply comes whole."""
    settings = (module.hparams.generation or {}) | generation
    if (settings.get("num_beams") or 1) > 1:
        yield module.generate(batch, **generation)[0]
        return
    streamer = TextIteratorStreamer(module.tokenizer, skip_prompt=True, skip_special_tokens=True)
    done: dict = {}

    def run() -> None:
        try:
            with torch.no_grad():  # grad mode is per thread
                done["text"] = module.generate(batch, streamer=streamer, **generation)[0]
        except Exception as err:  # raised below, in the page's thread, once the stream is closed
            done["error"] = err
            streamer.end()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    text = ""
    for piece in streamer:
        text += piece
        yield text.strip()
    thread.join()
    if "error" in done:
        raise done["error"]
    yield done["text"]


@torch.no_grad()
def mask_over(module: VLMLitModule, image: Image.Image, request: str) -> Image.Image:
    """The predicted mask lit over the image at its own size. The request is asked with the
    training answer's one ``[SEG]``; the processor needs a target for it, an empty one here."""
    meta = {"masks": [[]], "ignore": [], "height": image.height, "width": image.width}
    mask = module.segment(prompt_batch(module, image, request, ANSWER, meta=meta))[0]  # (S, S) bool
    full = np.asarray(Image.fromarray(mask.cpu().numpy()).resize(image.size, Image.Resampling.NEAREST))
    return Image.fromarray(spotlight(np.asarray(image), full))


@torch.no_grad()
def patch_attention(module: VLMLitModule, image: Image.Image):
    """A captioner's Q-Former tokens' attention over the image's patches, as a figure."""
    pixels = module.processor.pixels(image)[None].to(module.device)
    return patch_attention_figure(module.model, pixels)

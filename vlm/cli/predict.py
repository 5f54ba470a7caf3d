"""``vlm-predict ckpt=<path> image=<png> question="..."``: answer questions about an image
from a checkpoint alone (the tokenizer and model config travel inside it). A checkpoint whose
prompt reads no question (a captioner, a stage-1 ``plain`` one) needs none and prints the caption.
``input=<folder | LLaVA JSON | JSONL> output=<file.jsonl>`` answers many, in batches
(:mod:`vlm.cli.batch_predict`)."""

from __future__ import annotations

from pathlib import Path

import hydra
import torch
from lightning.pytorch.utilities import move_data_to_device
from omegaconf import DictConfig, ListConfig
from PIL import Image

from vlm.cli.batch_predict import predict_batch
from vlm.cli.common import CONFIG_DIR
from vlm.cli.load import load_for
from vlm.cli.predict_inputs import BadImage, read_image
from vlm.core.lit_module import VLMLitModule
from vlm.data.datasets import SkipSample
from vlm.runtime.errors import ConfigError, said_in_one_line


def answer(module: VLMLitModule, image: Image.Image, questions: list[str], **generation) -> list[str]:
    """Batched generation: one prompt per question, all about ``image``."""
    proc = module.processor
    try:
        items = [proc.encode_question(image, q) for q in questions]
    except SkipSample as err:
        raise ConfigError(f"vlm-predict: the question does not fit: {err}") from None
    return module.generate(move_data_to_device(proc.collate_prompts(items), module.device), **generation)


USAGE = (
    "usage: vlm-predict ckpt=<path.ckpt> image=<image file> question='...'"
    " | input=<folder | LLaVA .json | .jsonl of {image, question}> output=<answers.jsonl>"
)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="predict")
def main(cfg: DictConfig) -> None:
    if not cfg.image and not cfg.input:
        raise SystemExit(USAGE)
    torch.set_grad_enabled(False)
    with said_in_one_line():
        if cfg.image and cfg.input:
            raise ConfigError("vlm-predict: give image= (one image) or input= (many), not both")
        (predict_batch if cfg.input else predict)(cfg)


def predict(cfg: DictConfig) -> None:
    try:
        image = read_image(Path(cfg.image))
    except BadImage as err:
        raise ConfigError(f"vlm-predict: {err}: give image=<an image file>") from None
    module = load_for("vlm-predict", cfg.ckpt, cfg.device)
    captioner = not module.reads_question
    question = cfg.question
    questions = (
        list(question) if isinstance(question, ListConfig) else [] if question is None else [str(question)]
    )
    if not captioner and not questions:
        raise ConfigError(f"vlm-predict: {cfg.ckpt} answers questions: give question='...'")
    if not captioner and not all(q.strip() for q in questions):
        raise ConfigError("vlm-predict: the question is empty: give question='...'")
    generation = {k: v for k, v in cfg.generation.items() if v is not None}
    if captioner:
        print(f"caption: {answer(module, image, [''], **generation)[0]}")
        return
    for q, a in zip(questions, answer(module, image, questions, **generation), strict=True):
        print(f"Q: {q}\nA: {a}")


if __name__ == "__main__":
    main()

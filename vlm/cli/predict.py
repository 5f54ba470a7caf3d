"""``vlm-predict ckpt=<path> image=<png> question="..."``: answer questions about an image
from a checkpoint alone (the tokenizer and model config travel inside it). A checkpoint whose
prompt reads no question (a captioner, a stage-1 ``plain`` one) needs none and prints the caption."""

from __future__ import annotations

import hydra
import torch
from omegaconf import DictConfig, ListConfig
from PIL import Image

from vlm.cli.common import CONFIG_DIR
from vlm.core.lit_module import VLMLitModule
from vlm.data.datasets import SkipSample
from vlm.runtime.errors import said_in_one_line


def answer(module: VLMLitModule, image: Image.Image, questions: list[str], **generation) -> list[str]:
    """Batched generation: one prompt per question, all about ``image``."""
    proc = module.processor
    turns = [[{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": ""}] for q in questions]
    try:
        items = [proc.encode_prompt({"image": image, "conversations": t}) for t in turns]
    except SkipSample as err:
        raise SystemExit(f"vlm-predict: the question does not fit: {err}") from None
    return module.generate(proc.collate_prompts(items), **generation)


USAGE = "usage: vlm-predict ckpt=<path.ckpt> image=<image file> question='...'"


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="predict")
def main(cfg: DictConfig) -> None:
    if not cfg.ckpt or not cfg.image:
        raise SystemExit(USAGE)
    with said_in_one_line():
        predict(cfg)


def predict(cfg: DictConfig) -> None:
    torch.set_grad_enabled(False)
    module = VLMLitModule.from_checkpoint(cfg.ckpt)
    captioner = not module.reads_question
    question = cfg.question
    questions = (
        list(question) if isinstance(question, ListConfig) else [] if question is None else [str(question)]
    )
    if not captioner and not questions:
        raise SystemExit(USAGE)
    if not captioner and not all(q.strip() for q in questions):
        raise SystemExit("vlm-predict: the question is empty")
    try:
        image = Image.open(cfg.image).convert("RGB")
    except OSError as err:
        raise SystemExit(f"cannot read image '{cfg.image}': {err}") from err
    generation = {k: v for k, v in cfg.generation.items() if v is not None}
    if captioner:
        print(f"caption: {answer(module, image, [''], **generation)[0]}")
        return
    for q, a in zip(questions, answer(module, image, questions, **generation), strict=True):
        print(f"Q: {q}\nA: {a}")


if __name__ == "__main__":
    main()

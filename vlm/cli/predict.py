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


def answer(module: VLMLitModule, image: Image.Image, questions: list[str], **generation) -> list[str]:
    """Batched generation: one prompt per question, all about ``image``."""
    proc = module.processor
    items = [
        proc.encode_prompt(
            {
                "image": image,
                "conversations": [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": ""}],
            }
        )
        for q in questions
    ]
    if any(it is None for it in items):
        raise ValueError(f"a question does not fit max_length={proc.max_length} with the image tokens")
    batch = proc.collate_prompts(items)
    return module.generate(batch, **generation)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="predict")
def main(cfg: DictConfig) -> None:
    if not cfg.ckpt or not cfg.image:
        raise SystemExit("usage: vlm-predict ckpt=<path.ckpt> image=<image file> question='...'")
    torch.set_grad_enabled(False)
    module = VLMLitModule.from_checkpoint(cfg.ckpt)
    captioner = not module.reads_question
    if not cfg.question and not captioner:
        raise SystemExit("usage: vlm-predict ckpt=<path.ckpt> image=<image file> question='...'")
    try:
        image = Image.open(cfg.image).convert("RGB")
    except OSError as err:
        raise SystemExit(f"cannot read image '{cfg.image}': {err}") from err
    generation = {k: v for k, v in cfg.generation.items() if v is not None}
    if captioner:
        print(f"caption: {answer(module, image, [''], **generation)[0]}")
        return
    questions = list(cfg.question) if isinstance(cfg.question, ListConfig) else [str(cfg.question)]
    for q, a in zip(questions, answer(module, image, questions, **generation), strict=True):
        print(f"Q: {q}\nA: {a}")


if __name__ == "__main__":
    main()

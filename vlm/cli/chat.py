"""``vlm-chat ckpt=<path> image=<png>``: a conversation in the terminal with a checkpoint that
answers questions or captions. Each turn sends the whole conversation so far through the
family's chat template, as LLaVA's multi-turn data is read, so an answer can build on the
exchanges before it; replies are printed token by token as they are generated."""

from __future__ import annotations

import sys

import hydra
import torch
from lightning.fabric.utilities import move_data_to_device
from omegaconf import DictConfig
from PIL import Image
from transformers import TextStreamer

from vlm.cli.common import CONFIG_DIR
from vlm.cli.load import load_for
from vlm.core.lit_module import VLMLitModule
from vlm.data.datasets import SkipSample
from vlm.runtime.errors import ConfigError, said_in_one_line

HELP = """/image <path>  another image, and a new conversation about it
/reset         a new conversation about the same image
/exit          quit (or Ctrl-D)
/help          this list"""


def read_image(path: str | None) -> Image.Image:
    if not path:
        raise ConfigError("vlm-chat: no image: give image=<image file> (/image <path> in the chat)")
    try:
        return Image.open(path).convert("RGB")
    except OSError as err:  # missing, a folder, not an image
        raise ConfigError(f"cannot read image '{path}': {err}") from None


def turn(role: str, text: str) -> dict:
    return {"from": role, "value": text}


def reply(module: VLMLitModule, image: Image.Image, turns: list[dict], stream: bool, **generation) -> str:
    """The reply that ends ``turns`` (whose last, ``gpt`` turn is empty), printed as it is generated
    when ``stream``, else when complete (transformers streams no beam search)."""
    proc = module.processor
    prompt = proc.collate_prompts([proc.encode_prompt({"image": image, "conversations": turns})])
    if stream:
        generation["streamer"] = TextStreamer(module.tokenizer, skip_prompt=True, skip_special_tokens=True)
    text = module.generate(move_data_to_device(prompt, module.device), **generation)[0]
    if not stream:
        print(text, flush=True)
    return text


class Chat:
    """The image and the exchanges about it so far. A captioner keeps none: its prompt is the
    image alone (the ``plain`` template reads no turn after the first)."""

    def __init__(self, module: VLMLitModule, image: Image.Image, generation: dict):
        self.module, self.image, self.generation = module, image, generation
        self.captioner = not module.reads_question
        beams = (module.hparams.generation or {}) | generation
        self.stream = (beams.get("num_beams") or 1) == 1
        self.history: list[dict] = []

    def banner(self, ckpt: str) -> str:
        module = self.module
        lines = [
            f"vlm-chat: {ckpt} ({type(module.model).__name__}) on {module.device}",
            "It reads no question: Enter gives a caption." if self.captioner else "Ask about the image.",
        ]
        if not self.stream:
            lines.append("num_beams > 1: each reply is printed when complete (beam search does not stream).")
        return "\n".join([*lines, HELP])

    def ask(self, line: str) -> None:
        if self.captioner:
            asked = [turn("human", "<image>\n")]
        else:
            asked = [*self.history, turn("human", line if self.history else f"<image>\n{line}")]
        print("vlm> ", end="", flush=True)
        try:
            answer = reply(self.module, self.image, [*asked, turn("gpt", "")], self.stream, **self.generation)
        except SkipSample as err:
            print(f"\nthe conversation no longer fits ({err}): /reset starts a new one")
            return
        except KeyboardInterrupt:
            print("\n(interrupted)")
            return
        if not self.captioner:
            self.history = [*asked, turn("gpt", answer)]

    def command(self, name: str, arg: str) -> None:
        if name == "/help":
            print(HELP)
        elif name == "/reset":
            self.history = []
            print("(a new conversation)")
        elif name == "/image":
            try:
                self.image = read_image(arg)
            except ConfigError as err:
                print(f"{err}: still about the previous image", file=sys.stderr, flush=True)
                return
            self.history = []
            print(f"(a new conversation about {arg})")
        else:
            print(f"unknown command {name}: /help lists them")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="chat")
def main(cfg: DictConfig) -> None:
    with said_in_one_line():
        chat(cfg)


def chat(cfg: DictConfig) -> None:
    import readline  # noqa: F401  (line editing and history at the prompt)

    torch.set_grad_enabled(False)
    image = read_image(cfg.image)  # before the model is built: a typo costs no load
    module = load_for("vlm-chat", cfg.ckpt, cfg.device)
    session = Chat(module, image, {k: v for k, v in cfg.generation.items() if v is not None})
    print(session.banner(cfg.ckpt), flush=True)
    while True:
        try:
            line = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        name, _, arg = line.partition(" ")
        if name == "/exit":
            return
        if name.startswith("/"):
            session.command(name, arg.strip())
        elif line or session.captioner:
            session.ask(line)


if __name__ == "__main__":
    main()

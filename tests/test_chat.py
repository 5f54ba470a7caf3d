"""``vlm-chat`` as a user runs it, in a pseudo-terminal, on the checkpoint of the shared short
trained run (``trained_run`` in conftest): every reply is the module's own for the whole
conversation so far, replies stream, and what a user gets wrong is one line."""

import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor

import pexpect
import pytest
import torch
from PIL import Image
from runs import BIN, cli, shapesworld_root

from vlm.cli.chat import Chat
from vlm.cli.load import load_for
from vlm.data.datasets import SkipSample

pytestmark = pytest.mark.usefixtures("single_thread")  # the CLI runs with OMP_NUM_THREADS=1 too

QUESTIONS = ["How many shapes are there?", "Describe the image briefly.", "What color is the circle?"]
PROMPT = "you> "


@pytest.fixture(scope="module")
def ckpt(trained_run):
    return trained_run[0] / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def images(shapesworld):
    folder = shapesworld_root(shapesworld) / "images" / "test"
    return folder / "test_000000.png", folder / "test_000001.png"


@pytest.fixture(scope="module")
def module(ckpt):
    return load_for("test", ckpt, "cpu")


def reply_to(module, image_path, turns: list[dict], **generation) -> str:
    """The module's reply to ``turns`` (LLaVA conversation turns, the reply's own left out)."""
    proc, image = module.processor, Image.open(image_path).convert("RGB")
    item = proc.encode_prompt({"image": image, "conversations": [*turns, {"from": "gpt", "value": ""}]})
    return module.generate(proc.collate_prompts([item]), **generation)[0]


def replies(module, image_path, questions: list[str]) -> list[str]:
    """The module's replies to ``questions`` asked in turn, each prompt holding the exchanges before it."""
    turns, out = [], []
    for q in questions:
        turns.append({"from": "human", "value": q if turns else f"<image>\n{q}"})
        out.append(reply_to(module, image_path, turns))
        turns.append({"from": "gpt", "value": out[-1]})
    return out


def start(args: list[str], cwd) -> pexpect.spawn:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    return pexpect.spawn(
        str(BIN / "vlm-chat"), args, cwd=str(cwd), env=env, encoding="utf-8", timeout=90, echo=False
    )


def say(child: pexpect.spawn, line: str) -> str:
    """What the chat prints in answer to ``line``, up to its next prompt."""
    child.sendline(line)
    child.expect_exact(PROMPT)
    return child.before.replace("\r\n", "\n").rstrip("\n")


def answer(child: pexpect.spawn, question: str) -> str:
    text = say(child, question)
    assert text.startswith("vlm> "), text
    return text.removeprefix("vlm> ").strip()


def test_a_conversation_keeps_its_history_until_reset_or_a_new_image(module, ckpt, images, tmp_path):
    first, second = images
    asked = [*QUESTIONS, "What color is the triangle?"]  # the last one after two bad /image commands
    with_history = replies(module, first, asked)
    assert with_history[-1] != replies(module, first, asked[-1:])[0]  # so a dropped history shows
    long_question = " ".join(["red"] * (module.max_length() * 3 // 5))
    fits = [replies(module, image, [long_question])[0] for image in images]
    with pytest.raises(SkipSample):  # asked again after the first exchange, it does not fit
        replies(module, first, [long_question] * 2)
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not an image")

    child = start([f"ckpt={ckpt}", f"image={first}"], tmp_path)
    child.expect_exact(PROMPT)
    assert "Ask about the image." in child.before and "/reset" in child.before
    assert [answer(child, q) for q in QUESTIONS] == with_history[:-1]
    for bad in (tmp_path / "missing.png", not_an_image):
        (line,) = say(child, f"/image {bad}").splitlines()
        assert re.fullmatch(rf"cannot read image '{bad}': .+: still about the previous image", line)
    assert answer(child, asked[-1]) == with_history[-1]
    assert say(child, "/reset") == "(a new conversation)"
    assert answer(child, long_question) == fits[0]
    too_long = "longer than max_length: the prompt ends past max_length"
    assert say(child, long_question).splitlines() == [
        "vlm> ",
        f"the conversation no longer fits ({too_long}={module.max_length()}): /reset starts a new one",
    ]
    say(child, "/reset")
    assert answer(child, long_question) == fits[0]  # it fits again: the history is gone
    assert say(child, f"/image {second}") == f"(a new conversation about {second})"
    assert answer(child, long_question) == fits[1]
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_image_switches_the_image_and_a_bad_path_keeps_it(module, images, tmp_path, capsys):
    """On the chat itself: this short-trained model's replies hardly depend on the image."""
    first, second = (Image.open(path).convert("RGB") for path in images)
    session = Chat(module, first, {})
    session.command("/image", str(tmp_path / "missing.png"))
    assert session.image is first
    session.command("/image", str(images[1]))
    assert session.image.tobytes() == second.tobytes() != first.tobytes()


class Writes:
    """A stdout that keeps each write."""

    def __init__(self):
        self.parts: list[str] = []

    def write(self, text: str) -> int:
        if text:
            self.parts.append(text)
        return len(text)

    def flush(self) -> None:
        pass


@pytest.mark.parametrize("beams", [1, 2])
def test_a_reply_streams_piece_by_piece_unless_beam_search(module, images, monkeypatch, beams):
    """Sampled hot, so the reply has many tokens; the same seed gives the reply unstreamed."""
    generation = {"do_sample": True, "temperature": 5.0, "max_new_tokens": 12, "num_beams": beams}
    question = [{"from": "human", "value": f"<image>\n{QUESTIONS[0]}"}]
    torch.manual_seed(0)
    whole = reply_to(module, images[0], question, **generation)
    assert len(whole.split()) > 1
    out = Writes()
    monkeypatch.setattr(sys, "stdout", out)
    torch.manual_seed(0)
    Chat(module, Image.open(images[0]).convert("RGB"), generation).ask(QUESTIONS[0])
    monkeypatch.undo()
    assert out.parts[0] == "vlm> " and "".join(out.parts[1:]).strip() == whole
    pieces = [p for p in out.parts[1:] if p.strip()]
    assert len(pieces) > 1 if beams == 1 else pieces == [whole]


def test_what_a_user_gets_wrong_is_one_line(ckpt, images, tmp_path):
    """A missing checkpoint, and CUDA asked for on a machine without it (two commands at once)."""
    missing = tmp_path / "none.ckpt"
    errors = {
        f"ckpt={missing}": f"ConfigError: vlm-chat: checkpoint {missing} does not exist: "
        "give ckpt=<path.ckpt> (make train writes one)",
    }
    if not torch.cuda.is_available():
        errors["device=cuda"] = (
            "ConfigError: device=cuda but this machine has no CUDA device: use device=cpu (or auto)"
        )

    def run(arg: str):
        return cli("vlm-chat", [f"ckpt={ckpt}", f"image={images[0]}", arg], tmp_path, timeout=90)

    with ThreadPoolExecutor() as pool:
        for proc, error in zip(pool.map(run, errors), errors.values(), strict=True):
            assert proc.returncode == 1 and proc.stdout == ""
            assert proc.stderr.strip() == error

"""A checkpoint loaded for a command a person runs (``vlm-predict``, ``vlm-chat``, ``vlm-demo``):
every way that can fail is one line that says what to do, before any model is built where it
can be."""

from __future__ import annotations

from pathlib import Path

import torch

from vlm.core.checkpoint import read_checkpoint
from vlm.core.lit_module import VLMLitModule
from vlm.runtime.errors import ConfigError

TALKS = ("answers", "captions")  # what vlm-predict and vlm-chat need a checkpoint to do


def latest_checkpoint(root: str | Path = "logs/llava_shapes") -> Path | None:
    """The newest ``make train`` stage-2 checkpoint (best, else last), if there is one."""
    runs = sorted(Path(root).glob("*/stage2/checkpoints"))
    for folder in reversed(runs):
        found = sorted(folder.glob("best-*.ckpt")) or sorted(folder.glob("last.ckpt"))
        if found:
            return found[-1]
    return None


def device_for(name: str) -> torch.device:
    """``auto``: CUDA when there is one, else the CPU; ``cuda`` on a machine without CUDA is an
    error that says so."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but this machine has no CUDA device: use device=cpu (or auto)")
    return torch.device(name)


def what_it_does(module: VLMLitModule) -> str:
    """``answers`` (questions about an image), ``captions`` (no question read) or ``segments``."""
    if hasattr(module, "segment"):
        return "segments"
    return "answers" if module.reads_question else "captions"


def load_for(command: str, ckpt: str | Path | None, device: str = "auto", does: tuple[str, ...] = TALKS):
    """The checkpoint's module on ``device``, in eval mode, for ``command``; a missing path, a
    file that is not one of ours, or a family that does not do what the command does (``does``)
    is a one-line error."""
    if not ckpt:
        raise ConfigError(f"{command}: no checkpoint: give ckpt=<path.ckpt> (make train writes one)")
    if not Path(ckpt).exists():
        raise ConfigError(
            f"{command}: checkpoint {ckpt} does not exist: give ckpt=<path.ckpt> (make train writes one)"
        )
    where = device_for(device)
    read_checkpoint(ckpt, mmap=True)  # ours, whole and weights-only, before anything is built
    module = VLMLitModule.from_checkpoint(ckpt)
    kind = what_it_does(module)
    if kind not in does:
        family = type(module.model).__name__
        raise ConfigError(
            f"{command}: {ckpt} is a {family} checkpoint, which {kind} images; {command} needs one that "
            f"{' or '.join(does)} (vlm-eval scores any checkpoint)"
        )
    return module.to(where).eval()

"""``vlm-import hf=<folder or hub id> out=<path.ckpt> [<vlm-train overrides>]``: a llava-hf
``LlavaForConditionalGeneration`` checkpoint as one of ours (family=llava), so ``vlm-eval``,
``vlm-predict``, ``lmms-eval --model vlm_lab`` and ``stage.init_from=<path.ckpt>`` take it.

It is ``vlm-train family=llava stage.init_from=hf:<src>`` stopped before training: the module is
built as that run would build it (the overrides choose stage, template, recipe) and saved.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir

from vlm.cli.build import build_module, build_tokenizer, with_hf_architecture
from vlm.cli.common import CONFIG_DIR
from vlm.core.checkpoint import payload
from vlm.runtime.errors import said_in_one_line
from vlm.runtime.validate import validate

USAGE = "usage: vlm-import hf=<folder or hub id> out=<path.ckpt> [vlm-train overrides]"


def import_checkpoint(src: str, out: str | Path, overrides: list[str] = ()) -> Path:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["family=llava", f"stage.init_from=hf:{src}", *overrides])
    cfg = with_hf_architecture(cfg)
    validate(cfg, data=False)
    module = build_module(cfg, build_tokenizer(cfg, corpus=()))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    ckpt = {
        "state_dict": module.state_dict(),
        "hyper_parameters": dict(module.hparams),
        "pytorch-lightning_version": L.__version__,
        "vlm": payload(module),
    }
    tmp = out.with_name(f".{out.name}.partial")
    torch.save(ckpt, tmp)
    os.replace(tmp, out)
    return out


def main() -> None:
    given = dict(arg.split("=", 1) for arg in sys.argv[1:] if arg.startswith(("hf=", "out=")))
    rest = [arg for arg in sys.argv[1:] if not arg.startswith(("hf=", "out="))]
    if not given.get("hf") or not given.get("out"):
        raise SystemExit(USAGE)
    with said_in_one_line():
        out = import_checkpoint(given["hf"], given["out"], rest)
    print(f"imported {given['hf']} -> {out}")


if __name__ == "__main__":
    main()

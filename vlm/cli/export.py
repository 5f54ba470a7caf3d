"""``vlm-export ckpt=<path.ckpt> out=<folder>``: a checkpoint as a ``save_pretrained``-style
folder, for the families that define one (the Q-Former captioner)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from vlm.cli.common import CONFIG_DIR
from vlm.core.lit_module import VLMLitModule
from vlm.runtime.errors import said_in_one_line


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="export")
def main(cfg: DictConfig) -> None:
    if not cfg.ckpt or not cfg.out:
        raise SystemExit("usage: vlm-export ckpt=<path.ckpt> out=<folder>")
    with said_in_one_line():
        module = VLMLitModule.from_checkpoint(cfg.ckpt)
    if not hasattr(module, "save_pretrained"):
        raise SystemExit(f"{type(module).__name__} has no export format (only checkpoints)")
    module.save_pretrained(cfg.out)
    print(f"exported {cfg.ckpt} -> {cfg.out}")


if __name__ == "__main__":
    main()

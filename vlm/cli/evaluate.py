"""``vlm-eval ckpt=<path>``: VQA accuracy of a checkpoint on its data's test (or val) split.

The data config saved in the checkpoint is the default; ``data.<key>=...`` overrides it (for
example a real LLaVA-format benchmark JSON) without retraining anything.
"""

from __future__ import annotations

from pathlib import Path

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf

from vlm.cli.common import CONFIG_DIR
from vlm.core.lit_module import VLMLitModule
from vlm.runtime.errors import said_in_one_line
from vlm.runtime.validate import check_targets


def out_dir(cfg: DictConfig) -> Path:
    """``out_dir``, or ``eval/`` in the run the checkpoint belongs to (``<run>/checkpoints/x.ckpt``),
    so that evaluating never writes into the directory it was started from."""
    if cfg.get("out_dir"):
        return Path(cfg.out_dir)
    folder = Path(cfg.ckpt).resolve().parent
    return (folder.parent if folder.name == "checkpoints" else folder) / "eval"


def evaluate(cfg: DictConfig) -> dict[str, float]:
    module = VLMLitModule.from_checkpoint(cfg.ckpt)
    given = {key: value for key, value in (cfg.get("data") or {}).items() if value is not None}
    data_cfg = OmegaConf.merge(module.data_config or {}, given)
    check_targets(OmegaConf.create({"data": data_cfg}))
    datamodule = hydra.utils.instantiate(data_cfg)
    if not datamodule.has_split(cfg.split):
        raise SystemExit(f"vlm-eval: the data has no {cfg.split} split: set data.{cfg.split}_json=<file>")
    datamodule.prepare_data()
    datamodule.attach(module.processor)
    trainer = L.Trainer(
        logger=False, enable_checkpointing=False, default_root_dir=out_dir(cfg), **cfg.trainer
    )
    run = trainer.test if cfg.split == "test" else trainer.validate
    # One dict per loader (the data module's LOSS and GENERATE loaders); metric names are unique.
    return {key: value for loader in run(module, datamodule=datamodule) for key, value in loader.items()}


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval")
def main(cfg: DictConfig) -> None:
    if not cfg.ckpt:
        raise SystemExit("usage: vlm-eval ckpt=<path.ckpt> [split=test|val] [data.<key>=...]")
    with said_in_one_line():
        metrics = evaluate(cfg)
    for key, value in sorted(metrics.items()):
        print(f"{key}: {value:.4f}")
    print(f"sample predictions: {out_dir(cfg) / 'predictions'}")


if __name__ == "__main__":
    main()

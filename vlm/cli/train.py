"""``vlm-train``: compose -> data -> tokenizer -> model -> trainer -> fit -> test.

Everything is built from the composed config with ``hydra.utils.instantiate``; this file only
orders the steps (the tokenizer needs the data's text, the data needs the model's processor).
"""

from __future__ import annotations

import logging
import sys
import time

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf

from vlm.cli.build import build_module, build_tokenizer, with_hf_architecture
from vlm.cli.common import CONFIG_DIR, quote_numeric_options, unknown_option
from vlm.runtime.config_io import print_config_tree, save_resolved_config
from vlm.runtime.errors import said_in_one_line
from vlm.runtime.report import best_checkpoint, summary
from vlm.runtime.task import task_wrapper
from vlm.runtime.trainer import make_trainer
from vlm.runtime.validate import validate

log = logging.getLogger(__name__)


def build(cfg: DictConfig, output_dir: str | None = None):
    """Datamodule, tokenizer and LightningModule for ``cfg`` (shared by train and eval)."""
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.prepare_data()
    tokenizer = build_tokenizer(cfg, datamodule.corpus(), output_dir)
    module = build_module(cfg, tokenizer)
    module.data_config = OmegaConf.to_container(cfg.data, resolve=True)
    datamodule.attach(module.processor)
    return datamodule, tokenizer, module


@task_wrapper
def train(cfg: DictConfig) -> dict[str, float]:
    started = time.monotonic()
    output_dir = cfg.paths.output_dir
    cfg = with_hf_architecture(cfg)
    print_config_tree(cfg)
    save_resolved_config(cfg, output_dir)
    validate(cfg)  # before anything is generated, read, trained or loaded
    L.seed_everything(cfg.seed, workers=True)
    datamodule, _, module = build(cfg, output_dir)
    trainer = make_trainer(cfg)
    if cfg.train:
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path, weights_only=True)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if cfg.test and not datamodule.has_split("test"):
        log.info("no test split (data.test_json is null): testing skipped")
    elif cfg.test:
        best = best_checkpoint(trainer)
        trainer.test(module, datamodule=datamodule, ckpt_path=best or None, weights_only=True)
        metrics |= {k: float(v) for k, v in trainer.callback_metrics.items()}
    if trainer.is_global_zero:
        for line in summary(trainer, metrics, started):
            log.info(line)
    return metrics


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def _main(cfg: DictConfig) -> float | None:
    with said_in_one_line():
        metrics = train(cfg)
    return metrics.get(cfg.optimized_metric) if cfg.optimized_metric else None


def main() -> None:
    """``vlm-train``: Hydra's own command line, with number-named options quoted for it."""
    if wrong := unknown_option(sys.argv):
        sys.exit(f"vlm-train: {wrong}")
    sys.argv = quote_numeric_options(sys.argv)
    _main()


if __name__ == "__main__":
    main()

"""``vlm-train``: compose -> data -> tokenizer -> model -> trainer -> fit -> test.

Everything is built from the composed config with ``hydra.utils.instantiate``; this file only
orders the steps (the tokenizer needs the data's text, the data needs the model's processor).
"""

from __future__ import annotations

from pathlib import Path

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf

from vlm.cli import CONF_DIR
from vlm.cli.common import instantiate_callbacks, instantiate_loggers, save_run_config, task_wrapper


def build(cfg: DictConfig, output_dir: str | None = None):
    """Datamodule, tokenizer and LightningModule for ``cfg`` (shared by train, eval, bench)."""
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.prepare_data()
    corpus = datamodule.corpus()
    tokenizer = hydra.utils.instantiate(cfg.tokenizer, corpus=corpus)
    if output_dir:
        tokenizer.save_pretrained(Path(output_dir) / "tokenizer")
    module = hydra.utils.instantiate(cfg.family, tokenizer=tokenizer, _recursive_=False)
    module.data_config = OmegaConf.to_container(cfg.data, resolve=True)
    datamodule.attach(module.processor)
    return datamodule, tokenizer, module


@task_wrapper
def train(cfg: DictConfig) -> dict[str, float]:
    L.seed_everything(cfg.seed, workers=True)
    output_dir = cfg.paths.output_dir
    save_run_config(cfg, output_dir)
    datamodule, _, module = build(cfg, output_dir)
    trainer: L.Trainer = hydra.utils.instantiate(
        cfg.trainer,
        callbacks=instantiate_callbacks(cfg.get("callbacks")),
        logger=instantiate_loggers(cfg.get("logger"), cfg),
        default_root_dir=output_dir,
    )
    if cfg.get("train", True):
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if cfg.get("test", False):
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        trainer.test(module, datamodule=datamodule, ckpt_path=best or None)
        metrics |= {k: float(v) for k, v in trainer.callback_metrics.items()}
    return metrics


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    metrics = train(cfg)
    key = cfg.get("optimized_metric")
    return metrics.get(key) if key else None


if __name__ == "__main__":
    main()


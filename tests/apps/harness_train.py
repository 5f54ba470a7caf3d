"""A minimal entry point on ``conf/train.yaml`` that drives the harness with Lightning's BoringModel.

Harness tests run it in a subprocess: DDP starts its ranks by re-running the entry script, and a
multirun needs a real command line. Every rank writes ``rank<r>.json`` into the run dir.
"""

import json
from pathlib import Path

import hydra
import lightning as L
from lightning.pytorch.demos.boring_classes import BoringModel
from omegaconf import DictConfig

from vlm.cli.common import CONFIG_DIR
from vlm.core.optim import configure_optimizers
from vlm.runtime.config_io import print_config_tree, save_resolved_config
from vlm.runtime.identity import run_identity
from vlm.runtime.task import task_wrapper
from vlm.runtime.trainer import make_trainer


class Boring(BoringModel):
    def __init__(self, optimizer, scheduler) -> None:
        super().__init__()
        self.optimizer, self.scheduler = optimizer, scheduler

    def validation_step(self, batch, batch_idx):
        loss = self.step(batch)
        self.log("val/loss", loss, sync_dist=True)
        return loss

    def configure_optimizers(self):
        return configure_optimizers(
            self.optimizer, self.scheduler, self.parameters(), self.trainer.estimated_stepping_batches
        )


@task_wrapper
def train(cfg: DictConfig) -> dict[str, float]:
    print_config_tree(cfg)
    save_resolved_config(cfg, cfg.paths.output_dir)
    L.seed_everything(cfg.seed)
    trainer = make_trainer(cfg)
    model = Boring(hydra.utils.instantiate(cfg.optimizer), hydra.utils.instantiate(cfg.scheduler))
    trainer.fit(model)
    record = {
        "seed": cfg.seed,
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "name": run_identity(cfg).name,
    }
    Path(cfg.paths.output_dir, f"rank{trainer.global_rank}.json").write_text(json.dumps(record))
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


@hydra.main(config_path=CONFIG_DIR, config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    train(cfg)


if __name__ == "__main__":
    main()

"""The progress bar of a run: ``epoch 2`` (``epoch 2/3`` when epochs are the limit) and, beside
it, the optimizer step out of ``max_steps``, the train loss, the learning rate and the last
value of each figure the objective shows (``val/acc``, ``val/cider``); no ``v_num``."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar


class RunProgressBar(RichProgressBar):
    def _get_train_description(self, current_epoch: int) -> str:
        trainer = self.trainer
        description = f"epoch {current_epoch}"
        if trainer.max_steps < 0 and trainer.max_epochs and trainer.max_epochs > 0:
            description += f"/{trainer.max_epochs - 1}"
        return f"{description:{len(self.validation_description)}}"

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        shown = {}
        if trainer.max_steps > 0:
            shown["step"] = f"{trainer.global_step}/{trainer.max_steps}"
        shown.update(items)
        if trainer.optimizers:
            shown["lr"] = f"{trainer.optimizers[0].param_groups[0]['lr']:.2e}"
        return shown

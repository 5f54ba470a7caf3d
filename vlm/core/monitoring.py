"""Model health every ``family.monitor_every`` training steps: what the model's monitors say
(:meth:`~vlm.core.model.VLMModel.monitor_values`: gates, attention entropies) and the gradient
norm of the modules it names. The shared LightningModule adds this callback itself
(``configure_callbacks``), so every family's run has it whatever the ``callbacks`` group holds.
"""

from __future__ import annotations

import lightning as L
import torch


def log_now(trainer: L.Trainer, step: int, metrics: dict) -> None:
    """Straight to the loggers at ``step``: ``self.log`` would repeat a step's value on the
    steps in between, which a once-every-N-steps probe must not do."""
    if metrics:
        values = {k: float(v) for k, v in metrics.items()}
        for logger in trainer.loggers:
            logger.log_metrics(values, step=step)


class ModelMonitor(L.Callback):
    def __init__(self, every: int) -> None:
        self.every = every

    def _due(self, trainer: L.Trainer) -> bool:
        return self.every > 0 and trainer.training and trainer.global_step % self.every == 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._due(trainer):
            pl_module.model.arm_monitors()

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        """After the forward that recorded, before the update changes any gate."""
        if self._due(trainer):
            log_now(trainer, trainer.global_step, pl_module.model.monitor_values())

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        """Gradient norms after DDP's all-reduce: a module stuck at zero is what to catch."""
        if self._due(trainer):
            modules = pl_module.model.monitored_gradients()
            log_now(trainer, trainer.global_step, {k: grad_norm(m) for k, m in modules.items()})


def grad_norm(module: torch.nn.Module) -> torch.Tensor | float:
    grads = [p.grad.norm() for p in module.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(grads)) if grads else 0.0

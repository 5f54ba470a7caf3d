"""The model contract: what the shared LightningModule, recipes, ``family.compile``, the
processor and the benchmarks ask of a family's model, so that a family that only swaps a part
needs no LightningModule of its own.

A family's model subclasses :class:`VLMModel` (or the LLaVA core, which does) and is named by
``family.model._target_``; its ``from_config`` receives the rest of ``family.model`` and the
tokenizer, and builds the parts in a fixed order (random init draws from one generator).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from vlm.core.classes import Known
from vlm.core.recipes import keep_frozen_in_eval


class VLMModel(Known, nn.Module):
    nameable = False  # an abstract base

    @classmethod
    def from_config(cls, tokenizer: Any, **cfg: Any) -> VLMModel:
        """The model of ``family.model`` (its ``_target_`` removed), for ``tokenizer``."""
        raise NotImplementedError

    # -- what it is made of -------------------------------------------------------------------
    def parts(self) -> dict[str, nn.Module]:
        """Named components: what ``stage.tune`` trains, the parameter table's rows, what
        ``family.compile.parts`` can name."""
        raise NotImplementedError

    def blocks(self, part: str) -> nn.ModuleList | None:
        """The repeated blocks of a part (for ``partial`` / LoRA recipes and regional compile)."""
        return None

    def unused(self) -> list[nn.Module]:
        """Modules no output depends on (tower blocks past the layer read); kept so checkpoints
        match the hub's, but never trained."""
        return []

    def resolve_tune(self, tune: dict) -> dict:
        """The stage's recipe with this model's shorthands expanded (default: as given)."""
        return tune

    # -- what the processor needs ---------------------------------------------------------------
    @property
    def num_image_tokens(self) -> int:
        """``<image>`` placeholder tokens per image in the token sequence."""
        raise NotImplementedError

    def image_transforms(self) -> dict[str, Any]:
        """Tower name -> PIL image -> pixel tensor; several towers give ``pixel_values`` as a dict."""
        raise NotImplementedError

    # -- training ----------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        pixel_values: Tensor | dict[str, Tensor] | None = None,
        labels: Tensor | None = None,
        loss_weights: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """With ``labels``: ``{"loss", ...}``; without: ``{"logits"}``."""
        raise NotImplementedError

    def train(self, mode: bool = True) -> VLMModel:
        """Frozen parts stay in eval mode whatever Lightning asks."""
        super().train(mode)
        keep_frozen_in_eval(self.parts().values())
        return self

    def gradient_checkpointing_enable(self) -> None:
        """Recompute activations in the backward pass, in every part that supports it."""

    # -- monitoring (every ``family.monitor_every`` training steps) ------------------------------
    def arm_monitors(self) -> None:
        """Before a monitored step's forward: switch on what records during it."""

    def monitor_values(self) -> dict[str, float | Tensor]:
        """After that forward: figures to log (gates, attention entropies), by metric name."""
        return {}

    def monitored_gradients(self) -> dict[str, nn.Module]:
        """Metric name -> module whose gradient norm is logged after the monitored backward."""
        return {}

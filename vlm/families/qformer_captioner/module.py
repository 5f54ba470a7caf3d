"""The Q-Former captioner's training: the shared LightningModule plus the decoder's
progressive unfreezing (:mod:`~vlm.families.qformer_captioner.unfreeze`), which decides what
the decoder trains unless ``unfreeze`` is null and ``tune.decoder`` says otherwise, and the
analysis figures the test end draws into ``<run>/analysis/``. What is scored (BLEU-1..4,
METEOR, ROUGE-L, CIDEr-D of one caption per image against every reference) is the caption
objective's.
"""

from __future__ import annotations

from torch import nn

from vlm.core.lit_module import PROMPTS, VLMLitModule
from vlm.core.monitoring import log_now
from vlm.core.params import parameter_rows
from vlm.families.qformer_captioner.unfreeze import ProgressiveUnfreezing


class CaptionerModule(VLMLitModule):
    """``unfreeze``: the :class:`ProgressiveUnfreezing` arguments (null: ``tune.decoder``).
    ``caption_length``: caption tokens (EOS included) trained on and generated at most."""

    def __init__(
        self,
        *args,
        unfreeze: dict | None = None,
        caption_length: int = 20,
        num_analysis_images: int = 8,
        **kwargs,
    ):
        self.unfreezing: ProgressiveUnfreezing | None = None
        super().__init__(*args, **kwargs)
        self.phase = 0
        self._analysis_batch: dict | None = None

    # -- what trains -----------------------------------------------------------------------
    def apply_recipe(self, tune: dict) -> None:
        unfreeze = self.hparams.get("unfreeze")
        if unfreeze and "decoder" in tune:
            raise ValueError(
                "tune.decoder and unfreeze both set what the decoder trains: "
                "set family.unfreeze=null or drop tune.decoder"
            )
        if unfreeze:
            self.unfreezing = ProgressiveUnfreezing(self.model.llm, **unfreeze)
        super().apply_recipe(tune)  # the decoder is frozen here unless tune.decoder says otherwise
        if self.unfreezing:
            for p in self.unfreezing.ever_trained():
                p.requires_grad_(True)
            self.model.train(self.training)

    def _dormant(self) -> list[nn.Parameter]:
        """Parameters some later (or earlier) phase trains but the current one does not."""
        if self.unfreezing is None:
            return []
        now = {id(p) for p in self.unfreezing.trained(self.phase)}
        return [p for p in self.unfreezing.ever_trained() if id(p) not in now]

    def parameter_rows(self) -> list[dict]:
        dormant = {id(p) for p in self._dormant()}
        return parameter_rows(self.model.parts(), lambda p: p.requires_grad and id(p) not in dormant)

    def on_train_epoch_start(self) -> None:
        """Enter the epoch's phase: its learning rate becomes every group's base rate."""
        if self.unfreezing is None:
            return
        self.phase = self.unfreezing.phase_at(self.current_epoch)
        lr = self.unfreezing.lrs[self.phase]
        scheduler = self.lr_schedulers()
        for k, group in enumerate(self.optimizers().param_groups):
            if scheduler is None:
                group["lr"] = lr
            else:
                scheduler.base_lrs[k] = lr
                group["lr"] = lr * scheduler.lr_lambdas[k](scheduler.last_epoch)
        trained = sum(p.numel() for p in self.unfreezing.trained(self.phase))
        log_now(
            self.trainer,
            self.global_step,
            {"unfreeze/phase": self.phase, "unfreeze/decoder_trainable": trained},
        )

    def on_before_optimizer_step(self, optimizer) -> None:
        for p in self._dormant():
            p.grad = None

    # -- text --------------------------------------------------------------------------------
    def max_length(self) -> int:
        """bos, the image span (prefix mode), then at most ``caption_length`` caption tokens,
        EOS included: a longer caption is cut and has no EOS."""
        return 1 + self.model.num_image_tokens + self.hparams.caption_length

    def generation_settings(self, **overrides) -> dict:
        return super().generation_settings(**({"max_new_tokens": self.hparams.caption_length} | overrides))

    # -- evaluation ----------------------------------------------------------------------------
    def on_test_batch_end(self, outputs, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        """The first test prompts are kept for the analysis figures."""
        if dataloader_idx != PROMPTS or not batch or self._analysis_batch is not None:
            return
        n = self.hparams.num_analysis_images
        self._analysis_batch = {
            "input_ids": batch["input_ids"][:n],
            "attention_mask": batch["attention_mask"][:n],
            "pixel_values": batch["pixel_values"][:n],
            "references": self.objective.references(batch)[:n],
        }

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        batch, self._analysis_batch = self._analysis_batch, None
        if batch is None or not self.trainer.is_global_zero:
            return
        from vlm.families.qformer_captioner.analysis import write_analysis

        stats = write_analysis(self, batch, self.trainer.default_root_dir, self.loggers)
        for key, value in stats.items():
            self.log(f"test/{key}", value, rank_zero_only=True)

    # -- export ------------------------------------------------------------------------------
    def save_pretrained(self, out_dir) -> None:
        from vlm.families.qformer_captioner.export import save_pretrained

        save_pretrained(self, out_dir)

    @classmethod
    def from_pretrained(cls, path) -> CaptionerModule:
        from vlm.families.qformer_captioner.export import load_pretrained

        return load_pretrained(path)

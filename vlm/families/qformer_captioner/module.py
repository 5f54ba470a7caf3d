"""The Q-Former captioner as a LightningModule.

Recipe parts: ``vision_tower`` (CLIP, frozen), ``qformer``, ``conditioning`` (the decoder's
gated cross-attention blocks, or the prefix projection) and ``decoder``, whose training is
the ``unfreeze`` schedule's (:mod:`~vlm.families.qformer_captioner.unfreeze`) unless
``unfreeze`` is null and ``tune.decoder`` says otherwise. Validation and test generate one
caption per image and score it against every reference (BLEU-1..4, METEOR, ROUGE-L,
CIDEr-D); the test end draws the analysis figures into ``<run>/analysis/``.
"""

from __future__ import annotations

import hydra
from torch import nn

from vlm.core.caption_metrics import CaptionMetrics
from vlm.core.lit_module import VLMLitModule
from vlm.core.params import parameter_rows
from vlm.core.tokenizer import IMAGE_TOKEN
from vlm.core.zoo.llms import decoder_layers
from vlm.families.qformer_captioner.conditioning import (
    MODES,
    CrossAttentionConditioning,
    PrefixConditioning,
)
from vlm.families.qformer_captioner.model import QFormerCaptioner
from vlm.families.qformer_captioner.qformer import QFormer
from vlm.families.qformer_captioner.unfreeze import ProgressiveUnfreezing


def build_captioner(cfg: dict, tokenizer) -> QFormerCaptioner:
    tower = hydra.utils.instantiate(cfg["vision_tower"])
    llm = hydra.utils.instantiate(cfg["llm"], vocab_size=len(tokenizer))
    qformer = QFormer(tower.hidden_size, **cfg["qformer"])
    options = dict(cfg["conditioning"])
    mode = options.pop("mode")
    d_llm = llm.config.hidden_size
    if mode == "cross_attention":
        heads = options.pop("num_heads", None) or llm.config.num_attention_heads
        conditioning = CrossAttentionConditioning(
            qformer.width, d_llm, len(decoder_layers(llm)), num_heads=heads, **options
        )
    elif mode == "prefix":
        conditioning = PrefixConditioning(qformer.width, d_llm, **options)
    else:
        raise ValueError(f"conditioning.mode={mode!r}: choose from {', '.join(MODES)}")
    return QFormerCaptioner(
        tower,
        qformer,
        conditioning,
        llm,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        select_layer=cfg.get("select_layer", -1),
        select_feature=cfg.get("select_feature", "cls_patch"),
    )


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
        self.val_acc = CaptionMetrics()
        self.test_acc = CaptionMetrics()
        self.phase = 0
        self._analysis_batch: dict | None = None

    def build_model(self, cfg: dict, tokenizer) -> nn.Module:
        return build_captioner(cfg, tokenizer)

    def parts(self) -> dict[str, nn.Module]:
        m = self.model
        return {
            "vision_tower": m.vision_tower,
            "qformer": m.connector,
            "conditioning": m.conditioning,
            "decoder": m.llm,
        }

    def blocks_of(self, name: str):
        return super().blocks_of({"decoder": "llm"}.get(name, name))

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
        return parameter_rows(self.parts(), lambda p: p.requires_grad and id(p) not in dormant)

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
        self.log_now({"unfreeze/phase": self.phase, "unfreeze/decoder_trainable": trained})

    def on_before_optimizer_step(self, optimizer) -> None:
        for p in self._dormant():
            p.grad = None

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        """``conditioning/gate_<block>_attn`` = tanh of each gate, every ``monitor_every`` steps."""
        if self.monitoring_step():
            self.log_now({f"conditioning/gate_{k}": v for k, v in self.model.conditioning.gates().items()})

    # -- text --------------------------------------------------------------------------------
    def max_length(self) -> int:
        """bos, the image span (prefix mode), then at most ``caption_length`` caption tokens,
        EOS included: a longer caption is cut and has no EOS."""
        return 1 + self.model.num_image_tokens + self.hparams.caption_length

    def generate(self, batch: dict, **overrides) -> list[str]:
        return super().generate(batch, **({"max_new_tokens": self.hparams.caption_length} | overrides))

    # -- evaluation ----------------------------------------------------------------------------
    def _eval_step(self, batch: dict, stage: str, metric: CaptionMetrics) -> None:
        bs = batch["input_ids"].shape[0]
        if "labels" in batch:
            self.log(f"{stage}/loss", self(batch)["loss"], batch_size=bs, add_dataloader_idx=False)
            return
        preds = self.generate(batch)
        refs = [m.get("captions") or [a] for m, a in zip(batch["meta"], batch["answer"], strict=True)]
        metric.update(preds, refs, batch["id"])
        room = self.hparams.num_logged_predictions - len(self._samples)
        for i in range(min(room, bs)):
            self._samples.append({"id": batch["id"][i], "prediction": preds[i], "references": refs[i]})
        if stage == "test" and self._analysis_batch is None:
            n = self.hparams.num_analysis_images
            self._analysis_batch = {
                "input_ids": batch["input_ids"][:n],
                "attention_mask": batch["attention_mask"][:n],
                "pixel_values": batch["pixel_values"][:n],
                "references": refs[:n],
            }

    def _eval_epoch_end(self, stage: str, metric: CaptionMetrics) -> None:
        scores = metric.compute()
        for key, value in scores.items():
            self.log(f"{stage}/{key}", value, prog_bar=key in ("bleu4", "cider"), add_dataloader_idx=False)
        metric.reset()
        self._write_samples(stage)

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

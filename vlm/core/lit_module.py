"""The LightningModule every family trains with: it builds ``family.model``, applies the stage's
recipe, computes the loss, asks its objective what to predict and score, logs, and sets up the
optimiser.

What the model is made of (parts, blocks, image transforms, monitors) is the model's
(:mod:`vlm.core.model`); what is measured is the objective's (:mod:`vlm.core.objectives`);
checkpoint contents are :mod:`vlm.core.checkpoint`'s; loggers, callbacks and the frozen dtype
are the runtime's. A family subclasses this only for training behaviour of its own.
"""

from __future__ import annotations

from functools import cached_property, partial
from pathlib import Path

import hydra
import lightning as L
import torch

from vlm.core.builder import build_model, build_objective
from vlm.core.checkpoint import load_matching, load_module, payload, plain
from vlm.core.classes import Known
from vlm.core.compile import compile_conf, compile_parts
from vlm.core.monitoring import ModelMonitor
from vlm.core.optim import configure_optimizers, decay_groups
from vlm.core.params import ParameterTable, parameter_rows
from vlm.core.processor import VLMProcessor
from vlm.core.recipes import apply_recipe
from vlm.core.samples import SampleTable
from vlm.core.templates import build_template

TEACHER_FORCED, PROMPTS = 0, 1  # the data module's validation and test loaders, in this order
MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values", "labels", "loss_weights")


class VLMLitModule(Known, L.LightningModule):
    """Hyper-parameters are the plain config dicts (never modules), so a checkpoint rebuilds
    its model from ``hyper_parameters`` plus the tokenizer stored beside the weights."""

    def __init__(
        self,
        model: dict,
        tune: dict,
        optimizer: dict,
        objective: dict,
        scheduler: dict | None = None,
        template: str = "auto",
        system_prompt: str | None = None,
        max_length: int = 512,
        generation: dict | None = None,
        qtype_weights: dict | None = None,
        init_from: str | None = None,
        gradient_checkpointing: bool = False,
        num_logged_predictions: int = 16,
        monitor_every: int = 50,
        compile: dict | None = None,
        tokenizer=None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["tokenizer"])
        hp = self.hparams
        for key, value in hp.items():  # plain values (a subclass's arguments too): weights-only checkpoints
            hp[key] = plain(value)
        if tokenizer is None:
            raise ValueError("a tokenizer is needed to build the model (vocabulary, <image> id)")
        self.tokenizer = tokenizer
        self.model = build_model(hp.model, tokenizer)
        if gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        self.apply_recipe(hp.tune)
        if init_from:
            load_matching(self, init_from)
        self.objective = build_objective(hp.objective)
        self.data_config: dict | None = None  # set by the entry point; saved for vlm-eval
        self.samples = SampleTable(num_logged_predictions)
        self._compile = compile_conf(hp.compile, list(self.model.parts()))
        self._compiled = False

    # -- set-up ------------------------------------------------------------------------------
    def apply_recipe(self, tune: dict) -> None:
        apply_recipe(self.model, tune)

    def max_length(self) -> int:
        """Tokens per sample after truncation (the image span included)."""
        return self.hparams.max_length

    @cached_property
    def processor(self) -> VLMProcessor:
        hp = self.hparams
        template = build_template(hp.template, self.tokenizer, hp.system_prompt)
        return VLMProcessor(
            self.tokenizer,
            template,
            self.model.image_transforms(),
            self.model.num_image_tokens,
            self.max_length(),
            hp.qtype_weights,
        )

    @property
    def reads_question(self) -> bool:
        """Whether a prompt's question reaches the model (not with the ``plain`` template: the
        image alone, as a captioner or a stage-1 checkpoint reads it)."""
        return self.processor.template.reads_question

    def parameter_rows(self) -> list[dict]:
        return parameter_rows(self.model.parts())

    def configure_model(self) -> None:
        """``compile.parts`` compiled here, in each process after a spawn (a compiled module
        does not pickle), once per module."""
        if self._compile.parts and not self._compiled:
            compile_parts(self.model, self._compile)
            self._compiled = True

    def configure_callbacks(self) -> list[L.Callback]:
        """The parameter table at fit start and the model's health logs, in every run (once:
        a ``test`` after ``fit`` finds them there)."""
        ours = [ParameterTable(), ModelMonitor(self.hparams.monitor_every)]
        return [c for c in ours if not any(type(t) is type(c) for t in self.trainer.callbacks)]

    # -- steps -------------------------------------------------------------------------------
    def forward(self, batch: dict) -> dict:
        return self.model(**{k: batch.get(k) for k in MODEL_INPUTS})

    def training_step(self, batch: dict, batch_idx: int):
        if not batch:  # the bad-sample policy dropped every sample of this batch
            return self._empty_step()
        out = self(batch)
        self.log("train/loss", out["loss"], prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return out["loss"]

    def _empty_step(self) -> torch.Tensor | None:
        """On one device the step is skipped. Under DDP a rank cannot skip (Lightning refuses,
        and the other ranks would wait for it in the gradient all-reduce): it takes part with a
        zero loss on every trained parameter, so the step averages the others' gradients with
        zeros and all ranks stay in step."""
        if self.trainer.world_size == 1:
            return None
        return sum(p.sum() for p in self.parameters() if p.requires_grad) * 0.0

    def generation_settings(self, **overrides) -> dict:
        """What :meth:`generate` decodes with: the trained settings, then ``overrides``; 16 new
        tokens unless set."""
        kwargs = dict(self.hparams.generation or {}) | overrides
        kwargs.setdefault("max_new_tokens", 16)
        return kwargs

    def generate(self, batch: dict, **overrides) -> list[str]:
        kwargs = self.generation_settings(**overrides)
        ids = self.model.generate(
            batch["input_ids"],
            batch["attention_mask"],
            batch.get("pixel_values"),
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
            **kwargs,
        )
        return [t.strip() for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(batch, "val", dataloader_idx)

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(batch, "test", dataloader_idx)

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict[str, list]:
        """The generated text of each prompt with its sample's id (``Trainer.predict`` over a
        benchmark's prompts, as ``vlm-eval benchmark=...`` runs it); a batch whose every sample
        was skipped gives none."""
        if not batch:
            return {"id": [], "text": []}
        return {"id": list(batch["id"]), "text": self.generate(batch)}

    def _evaluate(self, batch: dict, split: str, loader: int) -> None:
        """The teacher-forced loader gives the loss; the prompt loader what the objective scores."""
        if not batch:
            return
        if loader == TEACHER_FORCED:
            bs = batch["input_ids"].shape[0]
            self.log(f"{split}/loss", self(batch)["loss"], batch_size=bs, add_dataloader_idx=False)
            return
        predictions = self.objective.predict(self, batch)
        self.objective.update(split, batch, predictions)
        self.samples.add(self.objective.rows(batch, predictions, self.tokenizer))

    def on_validation_epoch_end(self) -> None:
        self._epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._epoch_end("test")

    def _epoch_end(self, split: str) -> None:
        shown = self.objective.progress
        for key, value in self.objective.compute(split).items():
            self.log(f"{split}/{key}", value, prog_bar=key in shown, add_dataloader_idx=False)
        self.objective.reset(split)
        self.samples.flush(self.trainer, split, self.global_step)

    # -- optimisation ------------------------------------------------------------------------
    def configure_optimizers(self):
        """The optimizer and scheduler configs are Hydra partials; the schedule length comes
        from the trainer."""
        hp = self.hparams
        optimizer = hydra.utils.instantiate(hp.optimizer)
        if self._gradient_scaler() is not None and self.trainer.gradient_clip_val:
            optimizer = partial(optimizer, fused=False)  # fp16: Lightning unscales, then clips
        return configure_optimizers(
            optimizer,
            hydra.utils.instantiate(hp.scheduler) if hp.scheduler else None,
            decay_groups(p for p in self.parameters() if p.requires_grad),
            self.trainer.estimated_stepping_batches,
        )

    def _gradient_scaler(self):
        return getattr(self.trainer.precision_plugin, "scaler", None)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        """Lightning's mixed-precision plugin refuses to clip for a fused optimizer (CUDA's
        default here), assuming the optimizer unscales fp16 gradients itself. Without a
        gradient scaler (bf16, fp32) the gradients are the true ones, so they are clipped here;
        with one (fp16) the optimizer is built unfused and Lightning unscales, then clips."""
        if not gradient_clip_val or self._gradient_scaler() is not None:
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if gradient_clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
        else:
            torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)

    # -- self-contained checkpoints ----------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["vlm"] = payload(self)

    @classmethod
    def from_checkpoint(cls, path: str | Path, map_location: str = "cpu") -> VLMLitModule:
        """The module a checkpoint holds, rebuilt offline from the file alone, in eval mode."""
        return load_module(path, VLMLitModule, map_location)

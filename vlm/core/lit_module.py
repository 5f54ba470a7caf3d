"""The LightningModule shared by the LLaVA-style families: losses, VQA metrics, logging,
optimiser set-up and self-contained checkpoints. A family only says how to build its model.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from transformers import AutoTokenizer

from vlm.core.compile import compile_conf, compile_parts
from vlm.core.metrics import VQAAccuracy
from vlm.core.optim import configure_optimizers
from vlm.core.params import parameter_rows, print_parameter_table
from vlm.core.processor import VLMProcessor, image_transform
from vlm.core.recipes import PartTune, apply_tune
from vlm.core.templates import build_template
from vlm.core.tokenizer import IMAGE_TOKEN
from vlm.core.zoo.llms import decoder_layers

FROZEN_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
SHAPESWORLD_QTYPES = ["caption", "color", "shape", "count", "position", "exists"]


def _container(cfg):
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg


class VLMLitModule(L.LightningModule):
    """Hyper-parameters are the plain config dicts (never modules), so a checkpoint rebuilds
    its model from ``hyper_parameters`` plus the tokenizer stored beside the weights."""

    def __init__(
        self,
        model: dict,
        tune: dict,
        optimizer: dict,
        scheduler: dict | None = None,
        template: str = "auto",
        system_prompt: str | None = None,
        max_length: int = 512,
        generation: dict | None = None,
        qtypes: list[str] | None = None,
        init_from: str | None = None,
        gradient_checkpointing: bool = False,
        num_logged_predictions: int = 16,
        monitor_every: int = 50,
        qtype_weights: dict | None = None,
        frozen_dtype: str | None = None,
        compile: dict | None = None,
        tokenizer=None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["tokenizer"])
        hp = self.hparams
        for key in ("model", "tune", "optimizer", "scheduler", "generation", "qtype_weights", "compile"):
            hp[key] = _container(hp[key])
        if tokenizer is None:
            raise ValueError("a tokenizer is needed to build the model (vocabulary, <image> id)")
        self.tokenizer = tokenizer
        self.model = self.build_model(hp.model, tokenizer)
        if gradient_checkpointing:  # non-reentrant: frozen inputs still pass gradients on
            self.model.llm.activation_checkpointing_enable({"use_reentrant": False})
            tower_checkpointing = getattr(self.model.vision_tower, "gradient_checkpointing_enable", None)
            if tower_checkpointing:  # composite towers that run trained modules inside
                tower_checkpointing()
        self.apply_recipe(hp.tune)
        if init_from:
            self.load_init(init_from)
        self.val_acc = VQAAccuracy(qtypes or SHAPESWORLD_QTYPES)
        self.test_acc = VQAAccuracy(qtypes or SHAPESWORLD_QTYPES)
        self._samples: list[dict] = []
        self.data_config: dict | None = None  # set by the entry point; saved for vlm-eval
        self._stored_low: list[torch.nn.Parameter] = []  # frozen weights held in frozen_dtype
        self._compile = compile_conf(hp.compile, list(self.parts()))
        self._compiled = False

    # -- what a family defines -------------------------------------------------------------
    def build_model(self, cfg: dict, tokenizer) -> torch.nn.Module:
        raise NotImplementedError

    def parts(self) -> dict[str, torch.nn.Module]:
        """Components for the recipe and the parameter table, with their repeated blocks."""
        m = self.model
        return {"vision_tower": m.vision_tower, "connector": m.connector, "llm": m.llm}

    def blocks_of(self, name: str):
        if name == "vision_tower":
            return self.model.vision_tower.blocks
        if name == "llm":
            return decoder_layers(self.model.llm)
        return None

    def image_transforms(self) -> dict:
        return {"vision": image_transform(self.model.vision_tower.image_spec)}

    # -- set-up ------------------------------------------------------------------------------
    def apply_recipe(self, tune: dict) -> None:
        parts = self.parts()
        unknown = set(tune) - set(parts)
        if unknown:
            raise ValueError(f"tune has unknown parts {sorted(unknown)}: known {sorted(parts)}")
        for name, part in parts.items():
            apply_tune(part, PartTune(**(tune.get(name) or {"type": "frozen"})), self.blocks_of(name), name)
        if not any(p.requires_grad for p in self.parameters()):
            raise ValueError("the recipe trains nothing: every part is frozen")
        self.model.train(self.training)  # frozen parts to eval now: Lightning keeps the modes it finds

    def load_init(self, path: str) -> None:
        """Initialise from an earlier stage's checkpoint (stage 2 from stage 1): every tensor
        whose name and shape match is copied; the counts are printed so a wrong file shows."""
        state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
        own = self.state_dict()
        match = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        self.load_state_dict(match, strict=False)
        print(f"init_from {path}: loaded {len(match)}/{len(own)} tensors ({len(state) - len(match)} skipped)")

    def max_length(self) -> int:
        """Tokens per sample after truncation (the image span included)."""
        return self.hparams.max_length

    @property
    def processor(self) -> VLMProcessor:
        hp = self.hparams
        return VLMProcessor(
            self.tokenizer,
            build_template(hp.template, self.tokenizer, hp.system_prompt),
            self.image_transforms(),
            self.model.num_image_tokens,
            self.max_length(),
            hp.qtype_weights,
        )

    def parameter_rows(self) -> list[dict]:
        return parameter_rows(self.parts())

    def monitoring_step(self) -> bool:
        """A training step on which a family's probes run (every ``monitor_every`` steps)."""
        every = self.hparams.monitor_every
        return self.training and every > 0 and self.global_step % every == 0

    def log_now(self, metrics: dict) -> None:
        """Straight to the loggers at this step: ``self.log`` would repeat a step's value on the
        steps in between, which a once-every-N-steps probe must not do."""
        if metrics:
            values = {k: float(v) for k, v in metrics.items()}
            for logger in self.loggers:
                logger.log_metrics(values, step=self.global_step)

    def configure_model(self) -> None:
        """``compile.parts`` compiled here, in each process after a spawn (a compiled module
        does not pickle), once per module."""
        if self._compile.parts and not self._compiled:
            compile_parts(self.parts(), self.blocks_of, self._compile)
            self._compiled = True

    def on_fit_start(self) -> None:
        self._store_frozen_low()
        rows = self.parameter_rows()
        if self.trainer.is_global_zero:
            print_parameter_table(rows)
        for logger in self.loggers:
            logger.log_hyperparams(
                {f"params/{r['component']}/{k}": r[k] for r in rows for k in ("total", "trainable")}
            )

    def on_fit_end(self) -> None:
        for p in self._stored_low:  # outside fit the module is fp32 again (eval, export, tests)
            p.data = p.data.float()
        self._stored_low = []

    def _store_frozen_low(self) -> None:
        """``frozen_dtype``: weights that never train are stored in bf16/fp16 for the fit.

        Under mixed precision autocast casts every frozen fp32 weight at each use anyway; storing
        them low halves their memory and skips those casts (a 1.1B frozen LLM: 4.4 -> 2.2 GB).
        Trained weights stay fp32 for the optimizer. Only with a mixed precision, where autocast
        reconciles the dtypes.
        """
        name = self.hparams.frozen_dtype
        if not name:
            return
        dtype = FROZEN_DTYPES.get(name)
        if dtype is None:
            raise ValueError(f"stage.frozen_dtype={name!r}: choose from {', '.join(FROZEN_DTYPES)} or null")
        precision = str(self.trainer.precision)
        if not precision.endswith("-mixed"):
            raise ValueError(
                f"stage.frozen_dtype={name} needs a mixed trainer.precision (bf16-mixed, 16-mixed), "
                f"got {precision}"
            )
        self._stored_low = [p for p in self.parameters() if not p.requires_grad and p.is_floating_point()]
        for p in self._stored_low:
            p.data = p.data.to(dtype)

    # -- steps -------------------------------------------------------------------------------
    def forward(self, batch: dict) -> dict:
        return self.model(
            batch["input_ids"],
            batch["attention_mask"],
            batch.get("pixel_values"),
            batch.get("labels"),
            batch.get("loss_weights"),
        )

    def training_step(self, batch: dict, batch_idx: int):
        if not batch:  # every sample of this batch was dropped by the bad-sample policy
            return None
        out = self(batch)
        bs = batch["input_ids"].shape[0]
        self.log("train/loss", out["loss"], prog_bar=True, batch_size=bs)
        return out["loss"]

    def generate(self, batch: dict, **overrides) -> list[str]:
        kwargs = dict(self.hparams.generation or {}) | overrides
        kwargs.setdefault("max_new_tokens", 16)
        ids = self.model.generate(
            batch["input_ids"],
            batch["attention_mask"],
            batch.get("pixel_values"),
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
            **kwargs,
        )
        return [t.strip() for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]

    def _eval_step(self, batch: dict, stage: str, metric: VQAAccuracy) -> None:
        bs = batch["input_ids"].shape[0]
        if "labels" in batch:
            self.log(f"{stage}/loss", self(batch)["loss"], batch_size=bs, add_dataloader_idx=False)
            return
        preds = self.generate(batch)
        qtypes = [m.get("qtype", "vqa") for m in batch["meta"]]
        metric.update(preds, batch["answer"], qtypes)
        room = self.hparams.num_logged_predictions - len(self._samples)
        for i in range(min(room, bs)):
            question = self.tokenizer.decode(batch["input_ids"][i], skip_special_tokens=True)
            self._samples.append(
                {
                    "id": batch["id"][i],
                    "qtype": qtypes[i],
                    "prompt": question.replace(IMAGE_TOKEN, ""),
                    "prediction": preds[i],
                    "answer": batch["answer"][i],
                }
            )

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        if batch:
            self._eval_step(batch, "val", self.val_acc)

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        if batch:
            self._eval_step(batch, "test", self.test_acc)

    def _eval_epoch_end(self, stage: str, metric: VQAAccuracy) -> None:
        if metric.update_called:
            for key, value in metric.compute().items():
                name = f"{stage}/acc" if key == "all" else f"{stage}/acc_{key}"
                self.log(name, value, prog_bar=key == "all", add_dataloader_idx=False)
        metric.reset()
        self._write_samples(stage)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val", self.val_acc)

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test", self.test_acc)

    def _write_samples(self, stage: str) -> None:
        """Sample predictions: a JSONL file in the run dir, and a wandb table when logging there."""
        samples, self._samples = self._samples, []
        if not samples or not self.trainer.is_global_zero or self.trainer.sanity_checking:
            return
        out = Path(self.trainer.default_root_dir) / "predictions" / f"{stage}_step{self.global_step}.jsonl"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("".join(json.dumps(s) + "\n" for s in samples))
        for logger in self.loggers:
            if type(logger).__name__ == "WandbLogger":
                cols = list(samples[0])
                logger.log_table(
                    f"{stage}/predictions", columns=cols, data=[[s[c] for c in cols] for s in samples]
                )

    # -- optimisation ------------------------------------------------------------------------
    def configure_optimizers(self):
        """AdamW-style groups: no weight decay on biases and norms (1-D tensors). The optimizer
        and scheduler configs are Hydra partials; the schedule length comes from the trainer."""
        hp = self.hparams
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.ndim >= 2]},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ]
        return configure_optimizers(
            hydra.utils.instantiate(hp.optimizer),
            hydra.utils.instantiate(hp.scheduler) if hp.scheduler else None,
            [g for g in groups if g["params"]],
            self.trainer.estimated_stepping_batches,
        )

    # -- self-contained checkpoints ----------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """The tokenizer travels inside the checkpoint: a run trained with an in-process
        tokenizer can be queried from the ``.ckpt`` file alone."""
        checkpoint["vlm"] = {
            "module": f"{type(self).__module__}.{type(self).__qualname__}",
            "tokenizer": tokenizer_to_dict(self.tokenizer),
            "data": self.data_config,
        }

    @classmethod
    def from_checkpoint(cls, path: str | Path, map_location: str = "cpu") -> VLMLitModule:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
        target = hydra.utils.get_class(ckpt["vlm"]["module"])
        tokenizer = tokenizer_from_dict(ckpt["vlm"]["tokenizer"])
        hp = _without_pretrained(dict(ckpt["hyper_parameters"]) | {"init_from": None})
        module = target(**hp, tokenizer=tokenizer)
        module.load_state_dict(ckpt["state_dict"])
        module.data_config = ckpt["vlm"].get("data")
        return module.eval()


def _without_pretrained(cfg):
    """The checkpoint holds every weight, so rebuilding must not fetch hub weights again."""
    if isinstance(cfg, dict):
        return {k: (False if k == "pretrained" else _without_pretrained(v)) for k, v in cfg.items()}
    return cfg


def checkpoint_tokenizer(path: str | Path):
    """The tokenizer stored in one of our checkpoints."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    if "vlm" not in ckpt:
        raise ValueError(f"{path} has no tokenizer: not a vlm-lab checkpoint")
    return tokenizer_from_dict(ckpt["vlm"]["tokenizer"])


def tokenizer_to_dict(tokenizer) -> dict[str, str]:
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return {p.name: p.read_text() for p in Path(tmp).iterdir() if p.is_file()}


def tokenizer_from_dict(files: dict[str, str]):
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in files.items():
            (Path(tmp) / name).write_text(text)
        return AutoTokenizer.from_pretrained(tmp)

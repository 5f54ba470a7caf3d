"""Structured-config schemas, so a misspelt key or a wrong type fails when Hydra composes.

lightning-hydra-template has no schemas: a typo in a YAML file surfaces (if ever) as a
``TypeError`` deep inside ``instantiate``, after data and models are built. Here each config
group file names its schema first in its defaults list and Hydra validates every merge on
top of it -- YAML values, experiment overrides and command-line overrides alike::

    # conf/trainer/default.yaml
    defaults:
      - _schema        # this group's dataclass (TrainerConf), registered below
      - _self_         # then this file's values, checked against it
    max_epochs: 1

Variants inherit the schema through their parent (``defaults: [default]``). A group whose
options take different arguments registers one schema per option (``optimizer/_schema_adamw``,
``optimizer/_schema_sgd``). A group that holds several named objects places each schema at
its key (``logger/csv.yaml``: ``defaults: [_schema_csv@csv, _self_]``).

The primary config starts from ``_train_schema`` (``TrainConf``): the top-level keys and
one field per config group. A group typed ``Any`` here takes its type from its own schema.
A new top-level key or config group needs a field there, or composing fails with
``Key 'x' not in 'TrainConf'`` -- which is also what catches a typo in an experiment file.

To add a schema for another group (encoder, llm, data, ...):
  1. write a dataclass below whose fields mirror the ``_target_``'s arguments;
  2. register it in ``register_schemas`` under that group, named ``_schema`` or ``_schema_<option>``;
  3. put ``_schema...`` then ``_self_`` at the top of the group's YAML files.
Names starting with ``_`` are schemas, not user options (tests skip them).

``+key=value`` on the command line still adds a key on purpose; everything else is checked.
"""

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from vlm.core.recipes import PartTune


@dataclass
class TrainerConf:
    """Arguments of ``lightning.pytorch.Trainer`` with Lightning's own defaults.

    ``logger`` and ``callbacks`` are absent on purpose: they come from their own groups.
    Fields typed ``Any`` accept several types in Lightning (e.g. ``devices: 2 | "auto" | [0, 1]``).
    """

    _target_: str = "lightning.pytorch.Trainer"
    accelerator: str = "auto"
    strategy: Any = "auto"
    devices: Any = "auto"
    num_nodes: int = 1
    precision: Any = None
    fast_dev_run: Any = False
    max_epochs: int | None = None
    min_epochs: int | None = None
    max_steps: int = -1
    min_steps: int | None = None
    max_time: Any = None
    limit_train_batches: Any = None
    limit_val_batches: Any = None
    limit_test_batches: Any = None
    limit_predict_batches: Any = None
    overfit_batches: Any = 0.0
    val_check_interval: Any = None
    check_val_every_n_epoch: int | None = 1
    num_sanity_val_steps: int | None = None
    log_every_n_steps: int | None = None
    enable_checkpointing: bool | None = None
    enable_progress_bar: bool | None = None
    enable_model_summary: bool | None = None
    accumulate_grad_batches: int = 1
    gradient_clip_val: float | None = None
    gradient_clip_algorithm: str | None = None
    deterministic: Any = None
    benchmark: bool | None = None
    inference_mode: bool = True
    use_distributed_sampler: bool = True
    profiler: Any = None
    detect_anomaly: bool = False
    barebones: bool = False
    plugins: Any = None
    sync_batchnorm: bool = False
    reload_dataloaders_every_n_epochs: int = 0
    default_root_dir: str | None = None


@dataclass
class PathsConf:
    root_dir: str = "${oc.env:PROJECT_ROOT,${hydra:runtime.cwd}}"
    data_dir: str = "${paths.root_dir}/data"
    log_dir: str = "${paths.root_dir}/logs"
    output_dir: str = "${hydra:runtime.output_dir}"
    work_dir: str = "${hydra:runtime.cwd}"


@dataclass
class AdamWConf:
    """``torch.optim.AdamW`` without ``params``: the module completes the partial.

    ``fused: null`` lets ``vlm.core.optim.build_optimizer`` turn it on when every parameter is on CUDA.
    ``_convert_: all`` passes plain lists, so optimizer state in checkpoints holds no OmegaConf objects.
    """

    _target_: str = "torch.optim.AdamW"
    _partial_: bool = True
    _convert_: str = "all"
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.01
    fused: bool | None = None


@dataclass
class SGDConf:
    _target_: str = "torch.optim.SGD"
    _partial_: bool = True
    _convert_: str = "all"
    lr: float = 1e-2
    momentum: float = 0.0
    dampening: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False
    fused: bool | None = None


@dataclass
class ConstantConf:
    """Arguments of ``vlm.core.schedulers.constant``; ``total_steps`` is filled by the module.

    Warmup is a ratio of the total steps unless ``warmup_steps`` is set, which wins.
    """

    _target_: str = "vlm.core.schedulers.constant"
    _partial_: bool = True
    warmup_ratio: float = 0.0
    warmup_steps: int | None = None


@dataclass
class CosineWarmupConf(ConstantConf):
    _target_: str = "vlm.core.schedulers.cosine_warmup"
    min_lr_ratio: float = 0.0


@dataclass
class LinearWarmupConf(ConstantConf):
    _target_: str = "vlm.core.schedulers.linear_warmup"
    min_lr_ratio: float = 0.0


@dataclass
class CSVLoggerConf:
    _target_: str = "lightning.pytorch.loggers.CSVLogger"
    save_dir: str = "${paths.output_dir}"
    name: str = "csv"
    version: Any = None
    prefix: str = ""
    flush_logs_every_n_steps: int = 100


@dataclass
class TensorBoardLoggerConf:
    _target_: str = "lightning.pytorch.loggers.TensorBoardLogger"
    save_dir: str = "${paths.output_dir}"
    name: str = "tensorboard"
    version: Any = None
    log_graph: bool = False
    default_hp_metric: bool = False
    prefix: str = ""


@dataclass
class WandbLoggerConf:
    """``WandbLogger`` arguments. ``null`` fields are filled at run time (``vlm.runtime.loggers``):

    ``mode``: ``WANDB_MODE`` if set, else online with credentials and offline without;
    ``name``/``group``: from the composed choices and the sweep; ``tags`` gain the choices.
    """

    _target_: str = "lightning.pytorch.loggers.WandbLogger"
    project: str = "vlm-lab"
    entity: str | None = None
    name: str | None = None
    group: str | None = None
    job_type: str | None = None
    tags: list[str] = field(default_factory=list)
    save_dir: str = "${paths.output_dir}"
    mode: str | None = None
    id: str | None = None
    log_model: Any = False
    prefix: str = ""


@dataclass
class LastCheckpointConf:
    """``callbacks.last_checkpoint`` (``vlm.runtime.callbacks.LastCheckpoint``)."""

    _target_: str = "vlm.runtime.callbacks.LastCheckpoint"
    dirpath: str = "${paths.output_dir}/checkpoints"
    filename: str = "last"
    every_n_train_steps: int | None = None


@dataclass
class StageConf:
    """A training stage: what each part trains (``tune.<part>``: a ``PartTune``), the learning
    rate, the conversation template, the checkpoint it starts from and the dtype its frozen
    weights are stored in during the fit (``frozen_dtype``: bf16 | fp16 | null)."""

    name: str = MISSING
    lr: float = MISSING
    template: str = "auto"
    init_from: str | None = None
    frozen_dtype: str | None = None
    tune: dict[str, PartTune] = field(default_factory=dict)


@dataclass
class TrainConf:
    """Top level of ``conf/train.yaml``: run identity, switches and one field per config group."""

    task_name: str = "train"
    run_name: str | None = None
    tags: list[str] = field(default_factory=list)
    seed: int | None = None
    ckpt_path: str | None = None
    allow_external_targets: bool = False
    train: bool = True
    test: bool = True
    monitor: str | None = None
    monitor_mode: str = "max"
    optimized_metric: str | None = None
    # Groups owned by the harness (schemas above).
    trainer: Any = None
    optimizer: Any = None
    scheduler: Any = None
    logger: Any = None
    callbacks: Any = None
    paths: Any = None
    # Model, objective and data groups; each may add its own schema.
    family: Any = None
    objective: Any = None
    encoder: Any = None
    augmenting: Any = None
    llm: Any = None
    connector: Any = None
    image_positions: Any = None
    fusion: Any = None
    layers: Any = None
    conditioning: Any = None
    unfreeze: Any = None
    sam: Any = None
    vlm: Any = None
    data: Any = None
    stage: Any = None
    tokenizer: Any = None


def register_schemas() -> None:
    """Store every schema in Hydra's ConfigStore; call before composing (idempotent)."""
    cs = ConfigStore.instance()
    cs.store(name="_train_schema", node=TrainConf)
    cs.store(group="trainer", name="_schema", node=TrainerConf)
    cs.store(group="paths", name="_schema", node=PathsConf)
    cs.store(group="stage", name="_schema", node=StageConf)
    cs.store(group="optimizer", name="_schema_adamw", node=AdamWConf)
    cs.store(group="optimizer", name="_schema_sgd", node=SGDConf)
    cs.store(group="scheduler", name="_schema_constant", node=ConstantConf)
    cs.store(group="scheduler", name="_schema_cosine_warmup", node=CosineWarmupConf)
    cs.store(group="scheduler", name="_schema_linear_warmup", node=LinearWarmupConf)
    cs.store(group="logger", name="_schema_csv", node=CSVLoggerConf)
    cs.store(group="logger", name="_schema_tensorboard", node=TensorBoardLoggerConf)
    cs.store(group="logger", name="_schema_wandb", node=WandbLoggerConf)
    cs.store(group="callbacks", name="_schema_last", node=LastCheckpointConf)

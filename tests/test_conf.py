"""conf/: every option composes, schemas reject typos and wrong types, and the harness builds
trainers, loggers and callbacks from the composed groups."""

import math
from pathlib import Path

import hydra
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, RichProgressBar
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.strategies import DDPStrategy
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import MissingMandatoryValue

from vlm.cli.common import CONFIG_DIR, quote_numeric_options
from vlm.core import schedulers
from vlm.runtime.callbacks import LastCheckpoint, instantiate_callbacks
from vlm.runtime.checkpoint_io import AtomicCheckpointIO
from vlm.runtime.identity import choice_tags, run_name
from vlm.runtime.loggers import instantiate_loggers, resolve_wandb_mode
from vlm.runtime.trainer import make_trainer


def compose_train(overrides: list[str], output_dir: Path) -> DictConfig:
    """Compose conf/train.yaml as a run would see it: Hydra config set, output dir in tmp."""
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
        cfg.paths.log_dir = str(output_dir / "logs")
    HydraConfig.instance().set_config(cfg)
    return cfg


def compose_error(overrides: list[str]) -> str:
    """The full message (with its cause) of a composition that must fail."""
    with (
        initialize_config_dir(CONFIG_DIR, version_base="1.3"),
        pytest.raises(ConfigCompositionException) as err,
    ):
        compose("train", overrides=overrides)
    return f"{err.value}\n{err.value.__cause__}"


USER_FILLS = {("layers", "custom"): "layers.blocks"}  # options that ask for a value (???)


EVAL_GROUPS = ("benchmark",)  # composed by eval.yaml, not train.yaml (tests/test_benchmarks.py)


def group_options() -> list[tuple[str, str]]:
    """(group, option) for every YAML under conf/ subfolders that train.yaml composes;
    `_`-names are schemas, not options."""
    root = Path(CONFIG_DIR)
    found = []
    for path in sorted(root.rglob("*.yaml")):
        group = path.parent.relative_to(root).as_posix()
        if group != "." and group not in EVAL_GROUPS and not path.stem.startswith("_"):
            found.append((group, path.stem))
    return found


@pytest.fixture(autouse=True)
def _forget_hydra_config():
    """compose_train sets Hydra's global run config; later tests must not see it."""
    yield
    HydraConfig.instance().cfg = None


@pytest.fixture(scope="module")
def default_choices(tmp_path_factory) -> dict:
    cfg = compose_train([], tmp_path_factory.mktemp("default"))
    return dict(cfg.hydra.runtime.choices)


@pytest.mark.parametrize(("group", "option"), group_options(), ids=lambda v: str(v))
def test_every_option_composes(group, option, default_choices, tmp_path):
    prefix = "" if group in default_choices else "+"
    cfg = compose_train(quote_numeric_options([f"{prefix}{group}={option}"]), tmp_path)
    assert cfg.hydra.runtime.choices[group] == option
    run = OmegaConf.masked_copy(cfg, [key for key in cfg if key != "hydra"])
    if (group, option) in USER_FILLS:  # a template: composing it alone names what to fill in
        with pytest.raises(MissingMandatoryValue, match=USER_FILLS[group, option]):
            OmegaConf.to_container(run, resolve=True, throw_on_missing=True)
        return
    OmegaConf.to_container(run, resolve=True, throw_on_missing=True)
    assert cfg.paths.output_dir == str(tmp_path)


def test_hydra_dirs_follow_task_name(tmp_path):
    cfg = compose_train(["task_name=probe"], tmp_path)
    assert cfg.hydra.run.dir.startswith(f"{tmp_path}/logs/probe/runs/")
    assert cfg.hydra.sweep.dir.startswith(f"{tmp_path}/logs/probe/multiruns/")
    assert cfg.hydra.job.chdir is False


@pytest.mark.parametrize(
    ("option", "accelerator", "world_size"),
    [("default", "auto", 1), ("cpu", "cpu", 1), ("ddp_cpu", "cpu", 2)],
)
def test_cpu_trainers_instantiate(option, accelerator, world_size, tmp_path):
    cfg = compose_train([f"trainer={option}"], tmp_path)
    assert cfg.trainer.accelerator == accelerator
    trainer = hydra.utils.instantiate(cfg.trainer, logger=False)
    assert trainer.world_size == world_size
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert trainer.default_root_dir == str(tmp_path)
    if world_size > 1:
        assert isinstance(trainer.strategy, DDPStrategy)


def test_ddp_trainer_refuses_to_relaunch_pytest(tmp_path):
    cfg = compose_train(["trainer=ddp_cpu"], tmp_path)
    with pytest.raises(RuntimeError, match="re-running the entry script, here pytest"):
        make_trainer(cfg, harness=False)


def test_debug_fdr_sets_fast_dev_run(tmp_path):
    cfg = compose_train(["debug=fdr", "trainer=ddp_cpu"], tmp_path)
    assert cfg.trainer.fast_dev_run is True
    assert (cfg.trainer.accelerator, cfg.trainer.devices, cfg.trainer.strategy) == ("cpu", 1, "auto")
    assert cfg.task_name == "debug"


def test_debug_profiler_profiles_the_run_as_configured(tmp_path):
    """No anomaly detection, no DEBUG logs, the run's own steps and folder: what it times is the run."""
    plain = compose_train(["experiment=llava_shapes"], tmp_path)
    cfg = compose_train(["experiment=llava_shapes", "debug=profiler"], tmp_path)
    assert cfg.trainer.profiler._target_.endswith("SimpleProfiler")
    assert not cfg.trainer.detect_anomaly and cfg.task_name == plain.task_name
    assert cfg.trainer.max_steps == plain.trainer.max_steps and cfg.trainer.limit_train_batches is None
    assert cfg.hydra.job_logging.root.level == plain.hydra.job_logging.root.level


# --- schemas -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["trainer.max_epoch=3"], "Key 'max_epoch' not in 'TrainerConf'"),
        (["optimizer=sgd", "optimizer.betas=[0.9,0.9]"], "Key 'betas' not in 'SGDConf'"),
        (["scheduler.min_lr=0.1"], "Key 'min_lr' not in 'CosineWarmupConf'"),
        (["logger=wandb", "logger.wandb.projct=x"], "Key 'projct' not in 'WandbLoggerConf'"),
        (["paths.log_directory=/x"], "Key 'log_directory' not in 'PathsConf'"),
    ],
)
def test_misspelt_override_fails_naming_key_and_schema(overrides, expected):
    assert expected in compose_error(overrides)


@pytest.mark.parametrize(
    ("group", "text", "expected"),
    [
        ("trainer", "defaults:\n  - default\nmax_epoch: 3\n", "Key 'max_epoch' not in 'TrainerConf'"),
        ("debug", "# @package _global_\nsed: 3\n", "Key 'sed' not in 'TrainConf'"),
        (
            "logger",
            "defaults:\n  - csv\ncsv:\n  save_directory: x\n",
            "Key 'save_directory' not in 'CSVLoggerConf'",
        ),
    ],
)
def test_misspelt_key_in_a_yaml_file_fails_naming_the_file(group, text, expected, tmp_path):
    (tmp_path / group).mkdir()
    (tmp_path / group / "typo.yaml").write_text(text)
    message = compose_error([f"{group}=typo", f"hydra.searchpath=[file://{tmp_path}]"])
    assert f"In '{group}/typo'" in message
    assert expected in message


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("trainer.max_epochs=ten", "Value 'ten' of type 'str' could not be converted to Integer"),
        ("optimizer.lr=fast", "Value 'fast' of type 'str' could not be converted to Float"),
        ("scheduler.warmup_steps=0.5", "could not be converted to Integer"),
        ("seed=abc", "could not be converted to Integer"),
        ("train=maybe", "Value 'maybe' is not a valid bool"),
        ("tags=oops", "str is not a ListConfig, list or tuple"),
    ],
)
def test_wrong_type_fails(override, expected):
    message = compose_error([override])
    assert expected in message
    assert override.split("=")[0] in message


# --- loggers and callbacks ---------------------------------------------------------------------


@pytest.fixture
def no_wandb_credentials(monkeypatch, tmp_path):
    for var in ("WANDB_API_KEY", "WANDB_MODE", "NETRC", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


def test_wandb_defaults_to_offline_without_credentials(no_wandb_credentials, tmp_path):
    cfg = compose_train(["logger=wandb", "tags=[probe]"], tmp_path)
    (wandb_logger,) = instantiate_loggers(cfg.logger)
    assert isinstance(wandb_logger, WandbLogger)
    assert wandb_logger._wandb_init["mode"] == "offline"
    assert wandb_logger._wandb_init["dir"] == str(tmp_path)
    assert wandb_logger._wandb_init["tags"] == ["probe"]


def test_wandb_goes_online_with_a_netrc_entry_or_api_key(no_wandb_credentials, monkeypatch):
    home = no_wandb_credentials
    assert resolve_wandb_mode(None) == "offline"
    (home / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password abc\n")
    assert resolve_wandb_mode(None) == "online"
    (home / ".netrc").write_text("machine example.com\n  login user\n  password abc\n")
    assert resolve_wandb_mode(None) == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_wandb_mode(None) == "online"


def test_wandb_mode_env_and_config_take_precedence(no_wandb_credentials, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_wandb_mode(None) == "disabled"
    assert resolve_wandb_mode("offline") == "offline"
    with pytest.raises(ValueError, match="wandb mode"):
        resolve_wandb_mode("sometimes")


def test_many_loggers_and_none(no_wandb_credentials, tmp_path):
    cfg = compose_train(["logger=many"], tmp_path)
    loggers = instantiate_loggers(cfg.logger)
    assert [type(lg) for lg in loggers] == [CSVLogger, TensorBoardLogger, WandbLogger]
    assert instantiate_loggers(compose_train(["logger=none"], tmp_path).logger) == []


def test_default_callbacks(tmp_path):
    cfg = compose_train(
        ["callbacks.model_checkpoint.monitor=val/acc", "callbacks.model_checkpoint.mode=max"], tmp_path
    )
    callbacks = instantiate_callbacks(cfg.callbacks)
    (last,) = [cb for cb in callbacks if isinstance(cb, LastCheckpoint)]
    (best,) = [cb for cb in callbacks if isinstance(cb, ModelCheckpoint) and cb is not last]
    assert (best.monitor, best.mode, best.save_last) == ("val/acc", "max", False)
    assert (last.monitor, last.filename, last.save_top_k, last.between) == (None, "last", 1, 500)
    assert best.dirpath == last.dirpath == str(tmp_path / "checkpoints")
    assert any(isinstance(cb, LearningRateMonitor) for cb in callbacks)
    assert any(isinstance(cb, RichProgressBar) for cb in callbacks)
    without_logger = instantiate_callbacks(cfg.callbacks, have_logger=False)
    assert not any(isinstance(cb, LearningRateMonitor) for cb in without_logger)
    assert instantiate_callbacks(compose_train(["callbacks=none"], tmp_path).callbacks) == []


def test_run_name_and_tags_from_choices():
    choices = {
        "family": "layer_fusion",
        "encoder": "clip_vit_l14",
        "llm": "tiny_llama",
        "data": "shapesworld",
        "fusion": "E_D",
        "trainer": "cpu",
        "debug": None,
        "hydra/launcher": "basic",
        "logger": "wandb",
    }
    assert run_name(choices, fallback="train") == "layer_fusion_clip_vit_l14_tiny_llama_shapesworld"
    assert run_name({"encoder": "timm/vit_small", "trainer": "cpu"}, fallback="train") == "timm-vit_small"
    assert run_name({"trainer": "cpu"}, fallback="train") == "train"
    tags = choice_tags(choices)
    assert "fusion:E_D" in tags and "trainer:cpu" in tags
    assert not any(t.startswith(("hydra", "debug", "logger")) for t in tags)


# --- schedulers --------------------------------------------------------------------------------


def lr_curve(name: str, total: int, **kwargs) -> list[float]:
    """Learning rate of every optimizer step, as the Lightning loop applies it (step after update)."""
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1.0)
    sched = getattr(schedulers, name)(opt, total_steps=total, **kwargs)
    lrs = []
    for _ in range(total + 3):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_cosine_warmup_shape():
    lrs = lr_curve("cosine_warmup", 100, warmup_ratio=0.1, min_lr_ratio=0.1)
    warmup = lrs[:11]
    assert warmup[0] == pytest.approx(1 / 11) and warmup[-1] == pytest.approx(1.0)
    assert all(b > a for a, b in zip(warmup, warmup[1:], strict=False))
    decay = lrs[10:101]
    assert all(b <= a + 1e-12 for a, b in zip(decay, decay[1:], strict=False))
    assert lrs[55] == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the decay: mid-point of cosine
    assert lrs[100] == pytest.approx(0.1) and lrs[-1] == pytest.approx(0.1)  # held at min after the end
    assert lrs[32] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 22 / 90)))


def test_linear_warmup_shape_and_warmup_steps_win_over_ratio():
    lrs = lr_curve("linear_warmup", 50, warmup_ratio=0.5, warmup_steps=5)
    assert lrs[5] == pytest.approx(1.0) and lrs[4] == pytest.approx(5 / 6)
    slopes = [b - a for a, b in zip(lrs[5:50], lrs[6:51], strict=False)]
    assert all(s == pytest.approx(-1 / 45) for s in slopes)
    assert lrs[50] == pytest.approx(0.0)


def test_constant_shape():
    assert lr_curve("constant", 20) == [1.0] * 23
    lrs = lr_curve("constant", 20, warmup_steps=3)
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0]) and set(lrs[3:]) == {1.0}


@pytest.mark.parametrize(
    "kwargs", [{"warmup_ratio": 1.5}, {"warmup_steps": -1}, {"min_lr_ratio": 2.0}, {"total_steps": 0}]
)
def test_scheduler_arguments_are_checked(kwargs):
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1.0)
    with pytest.raises(ValueError):
        schedulers.cosine_warmup(opt, **{"total_steps": 10, **kwargs})


@pytest.mark.parametrize(
    ("launcher", "target"),
    [
        ("basic", "hydra._internal.core_plugins.basic_launcher.BasicLauncher"),
        ("joblib", "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"),
        ("submitit_slurm", "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"),
        ("slurm", "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"),
    ],
)
def test_launchers_compose(launcher, target, tmp_path):
    cfg = compose_train([f"hydra/launcher={launcher}"], tmp_path)
    assert cfg.hydra.launcher._target_ == target


def test_launcher_keys_are_checked_by_the_plugin_schema():
    assert "Key 'timeout_mins' not in 'SlurmQueueConf'" in compose_error(
        ["hydra/launcher=slurm", "hydra.launcher.timeout_mins=5"]
    )


def test_the_progress_bar_shows_step_loss_lr_and_no_version(tmp_path):
    """``epoch 0`` (no ``/-2`` for a step-limited run), then step / max_steps, the train loss
    and the learning rate; Lightning's ``v_num`` is gone; the cloud-logging tip is filtered."""
    import logging

    import lightning as L
    from lightning.pytorch.demos.boring_classes import BoringModel

    from vlm.runtime.progress import RunProgressBar

    class Model(BoringModel):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)["loss"]
            self.log("train/loss", loss, prog_bar=True)
            return loss

    bar = RunProgressBar()
    trainer = L.Trainer(
        max_steps=3, max_epochs=-1, callbacks=[bar], default_root_dir=tmp_path,
        enable_checkpointing=False, logger=L.pytorch.loggers.CSVLogger(tmp_path),
    )  # fmt: skip
    model = Model()
    trainer.fit(model)
    shown = bar.get_metrics(trainer, model)
    assert list(shown)[:2] == ["step", "train/loss"] and shown["step"] == "3/3"
    assert "v_num" not in shown and float(shown["lr"]) == 0.1
    assert bar._get_train_description(0).strip() == "epoch 0"
    tip = logging.LogRecord(
        "x", logging.INFO, "", 0, "💡 Tip: ... try installing [litlogger] ...", None, None
    )
    assert not logging.getLogger("lightning.pytorch.utilities.rank_zero").filter(tip)

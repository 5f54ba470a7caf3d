"""The run harness in isolation: atomic checkpoint writes, the DDP relaunch command line, the
task wrapper's guarantees and the optimizer/scheduler completion."""

import os
import sys
import types
from functools import partial

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from vlm.cli.common import CONFIG_DIR
from vlm.core.optim import build_optimizer, configure_optimizers
from vlm.core.schedulers import cosine_warmup
from vlm.runtime.checkpoint_io import AtomicCheckpointIO
from vlm.runtime.distributed import job_argv
from vlm.runtime.task import JobFailedError, task_wrapper

# --- atomic checkpoints ------------------------------------------------------------------------


def test_checkpoint_roundtrip_and_overwrite(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)
    io.save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    loaded = io.load_checkpoint(path)
    assert loaded["step"] == 2 and torch.equal(loaded["w"], torch.zeros(3))
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, path)
    before = path.read_bytes()

    def dies_halfway(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # preemption / time limit arriving mid-write

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_remote_paths_use_lightnings_writer():
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 3}, "memory://ckpts/last.ckpt")
    assert io.load_checkpoint("memory://ckpts/last.ckpt")["step"] == 3


# --- DDP relaunch command line -----------------------------------------------------------------


def test_job_argv_rebuilds_one_job_of_a_sweep():
    argv = ["/venv/bin/vlm-train", "-m", "--config-name", "train", "optimizer.lr=1e-3,1e-4", "seed=1"]
    task = ["optimizer.lr=1e-4", "seed=1"]
    hydra = [
        "hydra.sweep.dir=/s",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "hydra.mode=MULTIRUN",
        "hydra.job.chdir=true",
        "+hydra.verbose=true",
    ]
    assert job_argv(argv, task, hydra) == [
        "/venv/bin/vlm-train",
        "--config-name",
        "train",
        "optimizer.lr=1e-4",
        "seed=1",
        "hydra.job.chdir=true",
        "+hydra.verbose=true",
        "hydra.mode=RUN",
    ]


def test_job_argv_keeps_config_flags_in_either_form():
    argv = ["train.py", "-cp=/conf", "-cd", "/extra", "--multirun", "trainer=ddp"]
    assert job_argv(argv, ["trainer=ddp"], []) == [
        "train.py",
        "-cp=/conf",
        "-cd",
        "/extra",
        "trainer=ddp",
        "hydra.mode=RUN",
    ]


# --- task wrapper ------------------------------------------------------------------------------


@pytest.fixture
def hydra_job(tmp_path):
    """Set Hydra's run config as a (multi)run job would see it; forgotten afterwards."""

    def make(mode: str) -> None:
        with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
            cfg = compose("train", overrides=[f"hydra.mode={mode}", "seed=7"], return_hydra_config=True)
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(tmp_path)
            cfg.hydra.job.num = 3
        HydraConfig.instance().set_config(cfg)

    yield make
    HydraConfig.instance().cfg = None


@pytest.fixture
def fake_wandb(monkeypatch):
    finished = []
    module = types.SimpleNamespace(run=object(), finish=lambda exit_code: finished.append(exit_code))
    monkeypatch.setitem(sys.modules, "wandb", module)
    return finished


def test_single_run_failure_reraises_the_original_and_finishes_wandb(hydra_job, fake_wandb):
    hydra_job("RUN")

    @task_wrapper
    def task(cfg):
        raise ZeroDivisionError("boom")

    with pytest.raises(ZeroDivisionError, match="boom"):
        task(None)
    assert fake_wandb == [1]


def test_multirun_failure_names_the_job(hydra_job, fake_wandb, tmp_path):
    hydra_job("MULTIRUN")

    @task_wrapper
    def task(cfg):
        raise ZeroDivisionError("boom")

    with pytest.raises(JobFailedError, match=r"job #3 \[seed=7\] failed with ZeroDivisionError: boom") as err:
        task(None)
    assert str(tmp_path) in str(err.value)
    assert isinstance(err.value.__cause__, ZeroDivisionError)
    assert fake_wandb == [1]


def test_success_returns_and_clears_ddp_launch_state(hydra_job, fake_wandb, monkeypatch):
    hydra_job("MULTIRUN")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")

    @task_wrapper
    def task(cfg):
        os.environ.update(LOCAL_RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1")  # what the launcher leaves
        return {"val/loss": 0.5}

    assert task(None) == {"val/loss": 0.5}
    assert "LOCAL_RANK" not in os.environ and "WORLD_SIZE" not in os.environ
    assert os.environ["MASTER_ADDR"] == "10.0.0.1"
    assert fake_wandb == [0]


# --- optimizer and scheduler completion --------------------------------------------------------


def adamw(**kwargs):
    return partial(torch.optim.AdamW, lr=1e-3, **kwargs)


def test_optimizer_on_cpu_is_not_fused_and_accepts_param_groups():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = build_optimizer(adamw(), [{"params": [a]}, {"params": [b], "lr": 1e-4}])
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 1e-4]
    assert not opt.param_groups[0]["fused"]


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_a_fused_optimizer_clips_under_bf16_mixed_precision(algorithm, shapesworld, tmp_path):
    """A fused AdamW (CUDA's default) with bf16-mixed and gradient clipping: Lightning's plugin
    refuses to clip for it; the module clips itself, since bf16 has no scaler to undo."""
    from runs import data_overrides, run_train, steps

    overrides = [*data_overrides(shapesworld), *steps(2, 2), "logger=csv", "test=false"]
    overrides += ["trainer.precision=bf16-mixed", "optimizer.fused=true", "trainer.gradient_clip_val=0.5"]
    metrics = run_train([*overrides, f"trainer.gradient_clip_algorithm={algorithm}"], tmp_path)
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))


@pytest.mark.gpu
def test_optimizer_on_cuda_is_fused_unless_set():
    params = [torch.nn.Parameter(torch.zeros(2, device="cuda"))]
    assert build_optimizer(adamw(), params).param_groups[0]["fused"] is True
    assert not build_optimizer(adamw(fused=False), params).param_groups[0]["fused"]


def test_configure_optimizers_steps_the_schedule_per_step():
    params = [torch.nn.Parameter(torch.zeros(2))]
    out = configure_optimizers(adamw(), partial(cosine_warmup, warmup_steps=2), params, total_steps=10)
    assert out["lr_scheduler"]["interval"] == "step"
    assert out["optimizer"].param_groups[0]["lr"] == pytest.approx(1e-3 / 3)
    with pytest.raises(ValueError, match="finite run"):
        configure_optimizers(adamw(), partial(cosine_warmup), params, total_steps=float("inf"))
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(adamw(), [])

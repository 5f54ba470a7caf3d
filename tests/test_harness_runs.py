"""Real Hydra command lines through the harness (tests/apps/harness_train.py, BoringModel):
a failed multirun job leaves the next one clean, and trainer=ddp_cpu inside a multirun runs each
job once, on two ranks, in the job's own folder."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

APP = Path(__file__).parent / "apps" / "harness_train.py"
TINY = [
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=2",
    "trainer.num_sanity_val_steps=0",
    "monitor=val/loss",  # what the BoringModel logs
    "monitor_mode=min",
]


def run_app(args: list[str], log_dir: Path, timeout: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(APP), *args, f"paths.log_dir={log_dir}", *TINY]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def sweep_jobs(log_dir: Path) -> list[Path]:
    (sweep,) = (log_dir / "train" / "multiruns").iterdir()  # exactly one sweep, however many ranks
    assert not (log_dir / "train" / "runs").exists()
    return sorted(p for p in sweep.iterdir() if p.is_dir())


def test_failed_job_does_not_break_the_sweep(tmp_path):
    proc = run_app(["-m", "optimizer.lr=-1,0.01", "trainer=cpu", "logger=many"], tmp_path, timeout=300)
    assert proc.returncode != 0, proc.stdout
    assert "JobFailedError: job #0 [optimizer.lr=-1" in proc.stderr
    failed, ok = sweep_jobs(tmp_path)
    assert "Invalid learning rate" in (failed / "harness_train.log").read_text()
    assert (ok / "checkpoints" / "last.ckpt").is_file()
    assert json.loads((ok / "rank0.json").read_text())["name"] == "llava_tiny_clip_tiny_llama_shapesworld-1"
    for job in (failed, ok):  # each job its own wandb run, finished, and its output dir printed
        assert len(list((job / "wandb").glob("offline-run-*"))) == 1
        assert f"Output dir: {job}" in (job / "harness_train.log").read_text()
    assert (ok / "resolved_config.yaml").read_text().count(str(ok)) >= 2


@pytest.mark.slow
def test_ddp_inside_a_multirun_runs_each_job_once_on_two_ranks(tmp_path):
    proc = run_app(["-m", "seed=1,2", "trainer=ddp_cpu", "logger=csv"], tmp_path, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sweep_jobs(tmp_path)
    assert [j.name for j in jobs] == ["0", "1"]
    for job, seed in zip(jobs, (1, 2), strict=True):
        ranks = [json.loads((job / f"rank{r}.json").read_text()) for r in (0, 1)]
        assert [(r["seed"], r["rank"], r["world_size"]) for r in ranks] == [(seed, 0, 2), (seed, 1, 2)]
        assert (job / "train_ddp_process_1.log").is_file()  # the child logged into this job's folder
        assert (job / "checkpoints" / "last.ckpt").is_file()

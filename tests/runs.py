"""Running the real entry points from tests: compose ``conf/train.yaml`` as ``@hydra.main``
would, call ``train``, run console scripts, and read back what a run wrote."""

import contextlib
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from vlm.cli.common import CONFIG_DIR
from vlm.cli.train import train

APPS = Path(__file__).parent / "apps"  # train_probes, importable by console-script runs too
BIN = Path(sys.executable).parent  # the venv's console scripts
SHAPES = ["num_train=64", "num_val=16", "num_test=16"]
PROBE = "+callbacks.batch_log._target_=train_probes.BatchLog"


def data_overrides(data_dir: Path) -> list[str]:
    """The shared tiny ShapesWorld: 64 train images (8 steps of 8), 16 val samples."""
    return [
        f"paths.data_dir={data_dir}",
        *(f"data.shapesworld.{kv}" for kv in SHAPES),
        "data.batch_size=8",
        "data.max_val_samples=16",
    ]


def steps(n: int, val_every: int) -> list[str]:
    """Train ``n`` optimizer steps, validating every ``val_every`` steps, logging every step."""
    return [
        f"trainer.max_steps={n}",
        "trainer.max_epochs=-1",
        "trainer.check_val_every_n_epoch=null",
        f"trainer.val_check_interval={val_every}",
        "trainer.log_every_n_steps=1",
    ]


def compose_run(overrides: list[str], output_dir: Path) -> DictConfig:
    """``conf/train.yaml`` as ``@hydra.main`` hands it to ``train``: Hydra's run config set
    (output dir in tmp), the ``hydra`` node itself removed."""
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def run_train(overrides: list[str], output_dir: Path) -> dict[str, float]:
    try:
        return train(compose_run(overrides, output_dir))
    finally:
        HydraConfig.instance().cfg = None


def cli(name: str, args: list[str], cwd: Path, timeout: int) -> subprocess.CompletedProcess:
    """A console script of this venv, as a user runs it (probes importable, one thread)."""
    path = os.pathsep.join(filter(None, [str(APPS), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, "WANDB_MODE": "offline"}
    return subprocess.run(
        [str(BIN / name), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def metrics_rows(run_dir: Path) -> list[dict[str, str]]:
    (path,) = run_dir.glob("csv/version_*/metrics.csv")
    with open(path) as f:
        return list(csv.DictReader(f))


def per_step(rows: list[dict[str, str]], key: str) -> dict[int, float]:
    """``key`` by global step, from the rows that have it."""
    return {int(r["step"]): float(r[key]) for r in rows if r.get(key)}


def batches(run_dir: Path, rank: int = 0) -> dict[int, list[str]]:
    lines = (run_dir / f"batches_rank{rank}.jsonl").read_text().splitlines()
    return {(d := json.loads(line))["step"]: d["samples"] for line in lines}


def final_state(run_dir: Path, rank: int = 0) -> dict:
    return json.loads((run_dir / f"state_rank{rank}.json").read_text())


def load_ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def shapesworld_root(data_dir: Path) -> Path:
    """The folder the data config generates the tiny ShapesWorld in, under ``data_dir``."""
    try:
        return Path(compose_run(data_overrides(data_dir), data_dir).data.root)
    finally:
        HydraConfig.instance().cfg = None


@contextlib.contextmanager
def one_thread():
    """In-process runs use one intra-op thread, as the CLI runs here do (OMP_NUM_THREADS=1): on
    shared cores two threads that wait for each other make a tiny model many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def on_cuda(batch: dict) -> dict:
    """A collated batch with its tensors on the GPU (the rest, ids and metadata, as it is)."""
    return {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}

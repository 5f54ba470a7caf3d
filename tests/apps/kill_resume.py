"""Resume, proven: a run killed with SIGKILL at random points, resumed each time from its
``last.ckpt``, ends with the weights, optimizer state and per-step losses of the same run left
alone.

    python tests/apps/kill_resume.py [--kills 3] [--workers 2] [--ddp] [--seed 0] [--out DIR]

Both runs are real ``vlm-train`` commands on a tiny ShapesWorld (64 train images, batches of 8:
three epochs in 24 steps, so kills land on both sides of epoch boundaries), validating every 4
steps and writing ``last.ckpt`` every 2. The killed run is started in its own process group
and the whole group (both DDP ranks) is killed once its batch log shows the chosen step; it
always writes into the same folder, so a temp file left by a kill mid-write is the next start's
to remove. Prints one line per attempt and the verdict; exits 1 if anything differs.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

BIN = Path(sys.executable).parent
STEPS, VAL_EVERY, SAVE_EVERY = 24, 4, 2


def args_for(out: Path, run: str, workers: int, ddp: bool) -> list[str]:
    return [
        f"paths.data_dir={out / 'data'}", "data.shapesworld.num_train=64", "data.shapesworld.num_val=16",
        "data.shapesworld.num_test=16", "data.batch_size=8", "data.max_val_samples=16",
        f"data.num_workers={workers}", f"trainer.max_steps={STEPS}", "trainer.max_epochs=-1",
        "trainer.check_val_every_n_epoch=null", f"trainer.val_check_interval={VAL_EVERY}",
        "trainer.log_every_n_steps=1", "trainer.num_sanity_val_steps=0", "optimizer.lr=1e-3",
        f"callbacks.last_checkpoint.every_n_train_steps={SAVE_EVERY}", "logger=csv", "test=false",
        "+callbacks.batch_log._target_=train_probes.BatchLog", "allow_external_targets=true",
        f"hydra.run.dir={out / run}", *(["trainer=ddp_cpu"] if ddp else []),
    ]  # fmt: skip


def start(args: list[str]) -> subprocess.Popen:
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(__file__).parent),
        "WANDB_MODE": "offline",
        "OMP_NUM_THREADS": "1",
    }
    return subprocess.Popen(
        [str(BIN / "vlm-train"), *args], env=env, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def batch_lines(run_dir: Path) -> list[dict]:
    path = run_dir / "batches_rank0.jsonl"
    return (
        [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    )


def kill_at(args: list[str], run_dir: Path, step: int, timeout: float = 600) -> None:
    """Run until one of its own batches (rank 0's log is shared by every attempt in the folder)
    starts at ``step`` or later, then SIGKILL the process group (every rank)."""
    before = len(batch_lines(run_dir))
    proc = start(args)
    deadline = time.monotonic() + timeout
    while not any(b["step"] >= step for b in batch_lines(run_dir)[before:]):
        if proc.poll() is not None:
            raise RuntimeError(f"the run ended before step {step}: {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no step {step} within {timeout} s")
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def finish(args: list[str]) -> None:
    proc = start(args)
    _, err = proc.communicate(timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"vlm-train failed: {err[-3000:]}")


def losses(run_dir: Path) -> dict[int, float]:
    """train/loss by step over every CSV the run folder holds (a resumed run's last word wins)."""
    out: dict[int, float] = {}
    for path in sorted(
        run_dir.glob("csv/version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1])
    ):
        with open(path) as f:
            out |= {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}
    return out


def tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for k in sorted(obj, key=str) for t in tensors(obj[k])]
    if isinstance(obj, list | tuple):
        return [t for v in obj for t in tensors(v)]
    return []


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(
        x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, b, strict=True)
    )


def prove(out: Path, kills: int = 3, workers: int = 2, ddp: bool = False, seed: int = 0) -> dict:
    """Run both; return what was compared and whether each is equal."""
    out.mkdir(parents=True, exist_ok=True)
    finish(args_for(out, "reference", workers, ddp))
    points = sorted(random.Random(seed).sample(range(1, STEPS), kills))
    chain = out / "killed"
    last = chain / "checkpoints" / "last.ckpt"
    resumed_from = []
    for step in points:
        resume = [f"ckpt_path={last}"] if last.exists() else []
        resumed_from.append(torch.load(last, weights_only=True)["global_step"] if last.exists() else 0)
        kill_at([*args_for(out, "killed", workers, ddp), *resume], chain, step)
    resumed_from.append(torch.load(last, weights_only=True)["global_step"])
    finish([*args_for(out, "killed", workers, ddp), f"ckpt_path={last}"])
    ref = torch.load(out / "reference" / "checkpoints" / "last.ckpt", weights_only=True)
    got = torch.load(last, weights_only=True)
    return {
        "kill steps": points,
        "resumed from steps": resumed_from,
        "global step": (ref["global_step"], got["global_step"]),
        "weights equal": same(tensors(ref["state_dict"]), tensors(got["state_dict"])),
        "optimizer equal": same(tensors(ref["optimizer_states"]), tensors(got["optimizer_states"])),
        "losses equal": losses(out / "reference") == losses(chain) and len(losses(chain)) == STEPS,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--ddp", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("logs/kill_resume"))
    a = parser.parse_args()
    result = prove(
        a.out / f"workers{a.workers}{'_ddp' if a.ddp else ''}_seed{a.seed}", a.kills, a.workers, a.ddp, a.seed
    )
    for key, value in result.items():
        print(f"{key:20} {value}")
    ok = all(v for k, v in result.items() if k.endswith("equal")) and len(set(result["global step"])) == 1
    print("resume proven" if ok else "RESUME DIFFERS")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

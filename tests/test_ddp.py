"""DDP on the CPU (``trainer=ddp_cpu``, two ranks started by re-running ``vlm-train``, as on a
GPU node): ranks train to identical weights on disjoint halves of every step's data, skip a
step together when one rank's batch is empty, and every experiment (slow) trains on two ranks,
in a single run and in a multirun."""

import json
import shutil
from pathlib import Path

import pytest
from hydra.core.hydra_config import HydraConfig
from runs import (
    PROBE,
    batches,
    cli,
    cli_train_args,
    compose_run,
    experiment_names,
    experiment_overrides,
    final_state,
    load_ckpt,
    offline_reason,
    shapesworld_root,
    steps,
    tiny_real_data,
)
from train_probes import state_sha


def test_ddp_cpu_two_ranks_train_to_identical_weights(shapesworld, tmp_path):
    args = [
        "trainer=ddp_cpu",
        *cli_train_args(shapesworld, tmp_path / "logs"),
        *steps(6, 3),
        PROBE,
        "trainer.num_sanity_val_steps=0",
    ]
    proc = cli("vlm-train", args, tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = (tmp_path / "logs" / "train" / "runs").iterdir()  # both ranks in one run dir
    ranks = [final_state(run, r) for r in (0, 1)]
    assert [(s["global_step"], s["world_size"]) for s in ranks] == [(6, 2), (6, 2)]
    assert ranks[0]["sha"] == ranks[1]["sha"]
    assert state_sha(load_ckpt(run / "checkpoints" / "last.ckpt")["state_dict"]) == ranks[0]["sha"]
    shards = [batches(run, r) for r in (0, 1)]  # each rank its own half of every step's data
    assert shards[0].keys() == shards[1].keys() == set(range(6))
    assert all(not set(shards[0][s]) & set(shards[1][s]) for s in range(6))


def batch_log(run: Path, rank: int) -> list[dict]:
    """Every batch a rank drew, in order: its global step then and its samples (none: empty)."""
    return [json.loads(line) for line in (run / f"batches_rank{rank}.jsonl").read_text().splitlines()]


def test_a_rank_whose_batch_is_empty_takes_part_with_zero_gradients(shapesworld, tmp_path):
    """Half the train images are missing and batches hold one sample, so on some steps one
    rank's batch is empty (``on_bad_sample=skip``) and the other's is not. That rank takes part
    in the step with zero gradients: the run ends, at the same step, with the same weights on
    both ranks (returning no loss there stops Lightning, or hangs the other rank)."""
    root = shapesworld_root(shapesworld)
    data_dir = tmp_path / "data"
    copy = data_dir / root.relative_to(shapesworld)
    shutil.copytree(root, copy)
    for image in sorted((copy / "images" / "train").glob("*.png"))[::2]:
        image.unlink()
    args = [
        "trainer=ddp_cpu",
        *cli_train_args(data_dir, tmp_path / "logs"),
        *steps(6, 6),
        PROBE,
        "data.batch_size=1",
        "trainer.num_sanity_val_steps=0",
    ]
    proc = cli("vlm-train", args, tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = (tmp_path / "logs" / "train" / "runs").iterdir()
    logs = [batch_log(run, r) for r in (0, 1)]
    assert [b["step"] for b in logs[0]] == [b["step"] for b in logs[1]] == list(range(6))
    assert any(bool(a["samples"]) != bool(b["samples"]) for a, b in zip(*logs, strict=True))
    ranks = [final_state(run, r) for r in (0, 1)]
    assert [s["global_step"] for s in ranks] == [6, 6] and ranks[0]["sha"] == ranks[1]["sha"]


def ddp_run(args: list[str], tmp_path: Path, timeout: int = 400) -> Path:
    """``vlm-train [flags] trainer=ddp_cpu <args>``; the log dir it wrote."""
    flags = [a for a in args if a.startswith("-")]
    overrides = [a for a in args if not a.startswith("-")]
    logs = [f"paths.log_dir={tmp_path / 'logs'}", "logger=csv"]
    proc = cli("vlm-train", [*flags, "trainer=ddp_cpu", *overrides, *logs], tmp_path, timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp_path / "logs"


@pytest.mark.slow
@pytest.mark.parametrize("experiment", experiment_names())
def test_every_experiment_trains_two_steps_on_two_ranks(experiment, shapesworld, tmp_path):
    """No parameter that trains is left without a gradient (DDP's "parameters that were not
    used in producing the loss"), in any family's recipe. Real-data experiments run on the
    files ShapesWorld wrote in their formats, at ``+size=tiny``."""
    overrides = experiment_overrides(experiment, shapesworld, *steps(2, 2), PROBE, "test=false")
    try:
        cfg = compose_run(overrides, tmp_path)
        if offline_reason(cfg):
            overrides += tiny_real_data(cfg, shapesworld, tmp_path / "data")
    finally:
        HydraConfig.instance().cfg = None
    logs = ddp_run([*overrides, "trainer.limit_val_batches=1", "trainer.num_sanity_val_steps=0"], tmp_path)
    (run,) = (logs / "train" / "runs").iterdir()
    ranks = [final_state(run, r) for r in (0, 1)]
    assert [s["global_step"] for s in ranks] == [2, 2] and ranks[0]["sha"] == ranks[1]["sha"]


@pytest.mark.slow
def test_a_multirun_of_the_default_experiment_runs_each_job_on_two_ranks(shapesworld, tmp_path):
    overrides = experiment_overrides("llava_shapes", shapesworld, *steps(2, 2), "test=false")
    logs = ddp_run(["-m", "seed=1,2", *overrides, "trainer.num_sanity_val_steps=0"], tmp_path, timeout=600)
    (sweep,) = (logs / "train" / "multiruns").iterdir()
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [j.name for j in jobs] == ["0", "1"]
    for job in jobs:
        assert load_ckpt(job / "checkpoints" / "last.ckpt")["global_step"] == 2

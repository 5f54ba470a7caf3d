"""``train(cfg)`` and ``vlm-train`` on tiny budgets: every experiment runs (its ``fast_dev_run``
metrics pinned to the stored reference), a short run learns and writes its outputs, a killed
run resumes exactly, a multirun writes complete jobs, and bad input fails in one line.

``tests/apps/train_probes.py`` adds observers through ``+callbacks.<name>._target_``: the samples
of every optimizer step and a hash of the final weights, per rank.
"""

import json
import logging
import re
import shutil
from pathlib import Path

import kill_resume
import pytest
import torch
from hydra.core.hydra_config import HydraConfig
from numerics import REFERENCE, fast_dev_run_overrides
from omegaconf import OmegaConf
from runs import (
    PROBE,
    batches,
    cli,
    cli_train_args,
    compose_run,
    data_overrides,
    experiment_names,
    final_state,
    load_ckpt,
    metrics_rows,
    per_step,
    pretrained_hub_ids,
    run_train,
    shapesworld_as,
    shapesworld_root,
    steps,
    tiny_real_data,
)
from train_probes import Preempted, state_sha

from vlm.cli.train import train
from vlm.core.zoo.errors import CheckpointMissingError

pytestmark = pytest.mark.usefixtures("single_thread")


# --- every experiment ------------------------------------------------------------------------------


# qformer_coco runs the captioner of qformer_shapes on COCO-format files: the slow suite's.
FDR_CASES = [
    pytest.param(e, marks=pytest.mark.slow) if e == "qformer_coco" else e for e in experiment_names()
]


@pytest.mark.parametrize("experiment", FDR_CASES)
def test_experiment_fast_dev_run(experiment, shapesworld, tmp_path):
    """Every experiment runs one train, val and test batch. Tiny ones on ShapesWorld: their
    metrics equal the pinned reference. Ones that read real data files run on the files
    ShapesWorld wrote in those formats; the real checkpoints they name cannot load offline, so
    as written they stop in validation with the one-line ``CheckpointMissingError`` naming one
    they use, and at ``+size=tiny`` (the same classes, small, on the CPU) they run."""
    try:
        cfg = compose_run(fast_dev_run_overrides(experiment, shapesworld), tmp_path)
        if cfg.data.source == "shapesworld":
            assert not pretrained_hub_ids(cfg), "a ShapesWorld experiment loads hub weights"
            metrics = train(cfg)
            assert torch.isfinite(torch.tensor(metrics["train/loss"]))
            scored = f"test/{cfg.monitor.split('/', 1)[1]}" if cfg.monitor else "test/acc"  # acc, cider
            assert (scored in metrics) == cfg.test
            reference = json.loads(REFERENCE.read_text())["fast_dev_run"][experiment]
            assert metrics == pytest.approx(reference, abs=1e-6)  # same names, same values
            return
        data = shapesworld_as(cfg.data.source, shapesworld, tmp_path / "data")
        as_written = compose_run([*fast_dev_run_overrides(experiment, shapesworld), *data], tmp_path)
        hub_ids = pretrained_hub_ids(as_written)
        with pytest.raises(CheckpointMissingError) as err:
            train(as_written)
        tiny = [
            *tiny_real_data(cfg, shapesworld, tmp_path / "data"),
            "trainer.accelerator=cpu",
            "trainer.devices=1",
        ]
        metrics = train(compose_run([*fast_dev_run_overrides(experiment, shapesworld), *tiny], tmp_path))
    finally:
        HydraConfig.instance().cfg = None
    message = str(err.value)
    assert "\n" not in message and err.value.hub_id in message
    assert err.value.hub_id in hub_ids, (err.value.hub_id, hub_ids)
    assert torch.isfinite(torch.tensor(metrics["train/loss"])) and "val/loss" in metrics
    assert ("test/loss" in metrics) == (cfg.data.source == "coco_captions")  # LLaVA files: no test split


# --- a short run learns, and writes everything a run should ----------------------------------------


def test_short_run_learns_and_writes_its_outputs(trained_run):
    out, metrics = trained_run
    rows = metrics_rows(out)
    loss = [v for _, v in sorted(per_step(rows, "train/loss").items())]
    assert len(loss) == 80
    start, end = sum(loss[:5]) / 5, sum(loss[-5:]) / 5
    assert end < 0.7 * start, (start, end)
    assert 0.0 <= metrics["test/acc"] <= 1.0

    ckpts = out / "checkpoints"
    assert load_ckpt(ckpts / "last.ckpt")["global_step"] == 80
    (best,) = ckpts.glob("best-*.ckpt")
    val_acc = per_step(rows, "val/acc")
    assert len(val_acc) == 2
    first_best = max(val_acc, key=lambda s: (val_acc[s], -s))  # mode=max keeps the first of equals
    assert load_ckpt(best)["global_step"] == first_best + 1  # a CSV row holds the 0-based step index

    resolved = OmegaConf.load(out / "resolved_config.yaml")
    assert resolved.paths.output_dir == str(out) and resolved.trainer.max_steps == 80
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    for name in ("val_step40", "val_step80", "test_step80"):
        lines = (out / "predictions" / f"{name}.jsonl").read_text().splitlines()
        assert lines and {"id", "qtype", "prediction", "answer"} <= json.loads(lines[0]).keys()
    (wandb_run,) = (out / "wandb").glob("offline-run-*")  # the default logger ran, offline
    assert list(wandb_run.glob("*.wandb"))


# --- resume ----------------------------------------------------------------------------------------

# Validation (and so last.ckpt) every 4 steps. The monitor never improves after the first
# validation (val/loss falls, mode=max): last.ckpt must follow the run, not the best file.
RESUME = [
    "logger=csv",
    "test=false",
    "trainer.num_sanity_val_steps=0",
    "optimizer.lr=1e-3",
    "monitor=val/loss",
    "monitor_mode=max",
    PROBE,
]


@pytest.fixture(scope="module")
def reference_run(shapesworld, tmp_path_factory) -> Path:
    """16 uninterrupted steps: two epochs of 8, a cosine schedule over 16 steps."""
    out = tmp_path_factory.mktemp("reference")
    run_train([*data_overrides(shapesworld), *RESUME, *steps(16, 4)], out)
    return out


def assert_continues(reference: Path, resumed: Path, from_step: int) -> None:
    """The resumed run starts at ``from_step`` and, from there, trains on the reference run's
    samples with its learning rates, step for step, to the same last step."""
    ref, res = metrics_rows(reference), metrics_rows(resumed)
    assert min(per_step(res, "train/loss")) == from_step
    for key in ("lr-AdamW/pg1", "lr-AdamW/pg2"):
        ref_lr = {s: lr for s, lr in per_step(ref, key).items() if s >= from_step}
        assert per_step(res, key) == ref_lr
    ref_batches = {s: b for s, b in batches(reference).items() if s >= from_step}
    assert batches(resumed) == ref_batches
    assert final_state(resumed)["global_step"] == final_state(reference)["global_step"] == 16


def test_last_checkpoint_follows_the_run_not_the_best_file(reference_run):
    ckpts = reference_run / "checkpoints"
    (best,) = ckpts.glob("best-*.ckpt")
    assert load_ckpt(best)["global_step"] == 4
    last = load_ckpt(ckpts / "last.ckpt")
    assert last["global_step"] == 16
    assert state_sha(last["state_dict"]) == final_state(reference_run)["sha"]


def test_resume_after_preemption_matches_the_uninterrupted_run(reference_run, shapesworld, tmp_path):
    """Killed as step 6 starts; last.ckpt is from step 4's validation, mid-epoch. Resumed from
    it, the rest of the run (epoch boundary included) is the uninterrupted run's, to the weights."""
    base = [*data_overrides(shapesworld), *RESUME, *steps(16, 4)]
    killed = tmp_path / "killed"
    preempt = ["+callbacks.preempt._target_=train_probes.Preempt", "+callbacks.preempt.at_step=6"]
    with pytest.raises(Preempted):
        run_train([*base, *preempt], killed)
    ckpt = load_ckpt(killed / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 4
    order = ckpt["VLMDataModule"]["train_order"]
    assert (order["epoch"], order["start"]) == (0, 32)  # 4 batches of 8 into epoch 0

    resumed = tmp_path / "resumed"
    run_train([*base, f"ckpt_path={killed / 'checkpoints' / 'last.ckpt'}"], resumed)
    assert_continues(reference_run, resumed, from_step=4)
    assert final_state(resumed)["sha"] == final_state(reference_run)["sha"]
    ref_weights = load_ckpt(reference_run / "checkpoints" / "last.ckpt")["state_dict"]
    res_weights = load_ckpt(resumed / "checkpoints" / "last.ckpt")["state_dict"]
    assert ref_weights.keys() == res_weights.keys()
    assert all(torch.equal(ref_weights[k], res_weights[k]) for k in ref_weights)


def test_resume_with_more_steps_follows_the_longer_schedule(reference_run, shapesworld, tmp_path):
    """A run that ended at max_steps=8, resumed with max_steps=16: step count, data order and
    the learning rate of every later step (the 16-step cosine, from the first resumed step on)
    are the 16-step run's. Weights differ: its first 8 steps ran on the 8-step schedule."""
    base = [*data_overrides(shapesworld), *RESUME]
    short = tmp_path / "short"
    run_train([*base, *steps(8, 4)], short)
    assert load_ckpt(short / "checkpoints" / "last.ckpt")["global_step"] == 8
    longer = tmp_path / "longer"
    run_train([*base, *steps(16, 4), f"ckpt_path={short / 'checkpoints' / 'last.ckpt'}"], longer)
    assert_continues(reference_run, longer, from_step=8)


def test_last_checkpoint_is_also_written_every_n_steps_and_stale_temp_files_go(shapesworld, tmp_path):
    """Validation only at step 8, ``last.ckpt`` every 2 steps: killed as step 5 starts, the run
    has step 4 on disk. Started again in the same folder, it removes the temp file a killed
    write left (its process is gone) and keeps one whose writer is alive."""
    base = [
        *data_overrides(shapesworld),
        *RESUME,
        *steps(8, 8),
        "callbacks.last_checkpoint.every_n_train_steps=2",
    ]
    out = tmp_path / "run"
    preempt = ["+callbacks.preempt._target_=train_probes.Preempt", "+callbacks.preempt.at_step=5"]
    with pytest.raises(Preempted):
        run_train([*base, *preempt], out)
    last = out / "checkpoints" / "last.ckpt"
    assert load_ckpt(last)["global_step"] == 4
    stale = out / "checkpoints" / ".last.ckpt.999999999.tmp"  # a write killed mid-way: no such process
    live = out / "checkpoints" / ".last.ckpt.1.tmp"  # pid 1 is alive: not ours to remove
    stale.write_bytes(b"")
    live.write_bytes(b"")
    run_train([*base, f"ckpt_path={last}"], out)
    assert not stale.exists() and live.exists()
    assert load_ckpt(last)["global_step"] == 8


# --- multirun --------------------------------------------------------------------------------------


@pytest.mark.slow  # the dense_connector matrix test runs a multirun in make test
def test_multirun_of_two_seeds_writes_two_complete_jobs(shapesworld, tmp_path):
    args = ["-m", "seed=1,2", *cli_train_args(shapesworld, tmp_path / "logs"), *steps(4, 4)]
    proc = cli("vlm-train", args, tmp_path, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (tmp_path / "logs" / "train" / "runs").exists()
    (sweep,) = (tmp_path / "logs" / "train" / "multiruns").iterdir()
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [j.name for j in jobs] == ["0", "1"]
    for job, seed in zip(jobs, (1, 2), strict=True):
        assert OmegaConf.load(job / "resolved_config.yaml").seed == seed
        assert load_ckpt(job / "checkpoints" / "last.ckpt")["global_step"] == 4
        assert len(per_step(metrics_rows(job), "train/loss")) == 4


# --- bad input through the CLI ---------------------------------------------------------------------


def test_select_layer_past_the_encoder_depth_fails_with_the_reason(shapesworld, tmp_path):
    args = [*cli_train_args(shapesworld, tmp_path / "logs"), "family.model.select_layer=9"]
    proc = cli("vlm-train", args, tmp_path, timeout=120)
    assert proc.returncode != 0
    reason = "select_layer=9 is outside the 2-block encoder 'tiny_clip' (valid: 0..2 or -1..-3; 0 is the "
    reason += "embeddings)"
    assert reason in proc.stderr


def test_missing_pretrained_weights_fail_with_the_one_line_zoo_error(shapesworld, tmp_path):
    """Offline, a real encoder's weights are missing: the user reads the zoo's one-line error
    (what is missing, how to fix it), not Hydra's nested wrappers of it."""
    args = [*cli_train_args(shapesworld, tmp_path / "logs"), "encoder=clip_vit_b32"]
    proc = cli("vlm-train", args, tmp_path, timeout=120)
    assert proc.returncode != 0
    expected = "CheckpointMissingError: checkpoint 'openai/clip-vit-base-patch32' is not in the local"
    (line,) = [ln for ln in proc.stderr.splitlines() if expected in ln]
    assert line.endswith("or set encoder.pretrained=false")
    assert "InstantiationException" not in proc.stderr


def test_missing_image_with_on_bad_sample_raise_names_the_file(shapesworld, tmp_path):
    """A copy of the data with one train image deleted; ``raise`` stops at it, naming it."""
    root = shapesworld_root(shapesworld)
    data_dir = tmp_path / "data"
    copy = data_dir / root.relative_to(shapesworld)
    shutil.copytree(root, copy)
    victim = copy / "images" / "train" / "train_000005.png"
    victim.unlink()
    args = [
        *cli_train_args(data_dir, tmp_path / "logs"),
        "data.on_bad_sample=raise",
        "trainer.max_epochs=1",
        "trainer.num_sanity_val_steps=0",
    ]
    proc = cli("vlm-train", args, tmp_path, timeout=120)
    assert proc.returncode != 0
    reason = rf"llava_train\.json record \d+ \(id \w+\): missing image: {re.escape(str(victim))}$"
    assert re.search(rf"BadSampleError: \S*{reason}", proc.stderr, flags=re.M), proc.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize(("workers", "ddp"), [(2, False), (2, True)], ids=["two_workers", "ddp_two_ranks"])
def test_a_run_killed_three_times_with_sigkill_resumes_to_the_uninterrupted_run(workers, ddp, tmp_path):
    """``tests/apps/kill_resume.py`` (also ``make prove-resume``): SIGKILL at three random steps
    of a 24-step run (three epochs), each time resumed from ``last.ckpt``."""
    result = kill_resume.prove(tmp_path, kills=3, workers=workers, ddp=ddp, seed=0)
    assert len(result["kill steps"]) == 3 and result["resumed from steps"][0] == 0
    assert result["global step"] == (24, 24)
    assert result["weights equal"] and result["optimizer equal"] and result["losses equal"]


def test_a_skip_run_over_bad_data_counts_names_and_logs_what_it_skipped(shapesworld, tmp_path, caplog):
    """Two train images gone, one train record whose reply starts past ``max_length``: the run
    trains on the rest; the skips are named in WARNINGs (file, record, reason),
    logged as ``data/skipped_<reason>`` and said in the run summary."""
    root = shapesworld_root(shapesworld)
    copy = tmp_path / "data" / root.relative_to(shapesworld)
    shutil.copytree(root, copy)
    records = json.loads((copy / "llava_train.json").read_text())
    for r in records[:2]:
        (copy / r["image"]).unlink()
    question = "<image>\n" + " ".join(["what"] * 400)  # its reply starts past max_length
    records[5]["conversations"] = [{"from": "human", "value": question}, records[5]["conversations"][1]]
    (copy / "llava_train.json").write_text(json.dumps(records))
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO):
        run_train(
            [*data_overrides(tmp_path / "data"), *steps(8, 8), "logger=csv", "family.max_length=80"], out
        )
    logged = {k: float(v) for r in metrics_rows(out) for k, v in r.items() if k.startswith("data/") and v}
    assert logged == {"data/skipped_missing_image": 2.0, "data/skipped_no_target_tokens_left": 1.0}
    text = "\n".join(r.getMessage() for r in caplog.records)
    for i, reason in ((0, "missing image"), (1, "missing image"), (5, "no target tokens left")):
        assert f"skipped {copy / 'llava_train.json'} record {i} (id {records[i]['id']}): {reason}: " in text
    assert "  skipped      2 missing image, 1 no target tokens left" in text

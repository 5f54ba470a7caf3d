"""The real entry points on tiny budgets: ``train(cfg)`` in process (every experiment, learning,
resume), ``vlm-train`` as a command (multirun, 2-rank CPU DDP, bad input), and ``vlm-predict`` /
``vlm-eval`` on the checkpoints it wrote. One tiny ShapesWorld is generated once and shared.

``tests/apps/train_probes.py`` adds observers through ``+callbacks.<name>._target_``: the samples
of every optimizer step and a hash of the final weights, per rank.
"""

import importlib.util
import json
import re
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from hydra.core.hydra_config import HydraConfig
from numerics import REFERENCE
from omegaconf import DictConfig, OmegaConf
from runs import (
    PROBE,
    batches,
    cli,
    compose_run,
    data_overrides,
    final_state,
    load_ckpt,
    metrics_rows,
    one_thread,
    per_step,
    run_train,
    shapesworld_root,
    steps,
)
from train_probes import Preempted, state_sha

from vlm.cli.common import CONFIG_DIR
from vlm.cli.train import train
from vlm.core.zoo.errors import CheckpointMissingError, UnknownModelError
from vlm.core.zoo.registry import llm_entry, vision_entry


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_thread():
        yield


# --- 1. every experiment -----------------------------------------------------------------------


def experiment_names() -> list:
    folder = Path(CONFIG_DIR) / "experiment"
    names = sorted(p.stem for p in folder.glob("*.yaml") if not p.stem.startswith("_"))
    return names or [pytest.param(None, marks=pytest.mark.skip(reason="conf/experiment/ has no files yet"))]


def pretrained_hub_ids(cfg: DictConfig) -> set[str]:
    """Hub ids of every zoo part (and hub tokenizer) the config loads with real weights."""
    found: set[str] = set()

    def walk(node) -> None:
        if isinstance(node, dict):
            if node.get("pretrained") is True and isinstance(node.get("name"), str):
                try:
                    entry = vision_entry(node["name"])
                except UnknownModelError:
                    entry = llm_entry(node["name"])
                found.add(entry.hub_id or node["name"])  # timm: its own hub id, named by the error
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(OmegaConf.to_container(cfg, resolve=True))
    if cfg.tokenizer.get("name") not in (None, "auto"):
        found.add(cfg.tokenizer.name)
    return found


def cfg_value(cfg: DictConfig, key: str):
    return OmegaConf.select(cfg, key, default=None)


@pytest.mark.parametrize("experiment", experiment_names())
def test_experiment_fast_dev_run(experiment, shapesworld, tmp_path):
    """Experiments on tiny parts run one train/val/test batch. Experiments that name real
    checkpoints cannot load them offline: they must compose and stop with the one-line
    ``CheckpointMissingError`` naming a checkpoint they use (shrinking them to ``size=tiny``
    would not test them: their layer indices and widths are the real models')."""
    overrides = [f"experiment={experiment}", "++trainer.fast_dev_run=true", "logger=csv"]
    try:
        as_written = compose_run(overrides, tmp_path)
        source = cfg_value(as_written, "data.source")
        if source != "shapesworld":
            pytest.skip(f"reads {source} files, which a test machine does not have")
        tiny = data_overrides(shapesworld)
        if cfg_value(as_written, "data.shapesworld.num_pretrain"):
            tiny.append("data.shapesworld.num_pretrain=16")  # stage-1 captions of their own scenes
        cfg = compose_run([*overrides, *tiny], tmp_path)
        hub_ids = pretrained_hub_ids(cfg)
        if not hub_ids:
            metrics = train(cfg)
            assert torch.isfinite(torch.tensor(metrics["train/loss"]))
            scored = f"test/{cfg.monitor.split('/', 1)[1]}" if cfg.monitor else "test/acc"  # acc, cider
            assert (scored in metrics) == cfg.test
            reference = json.loads(REFERENCE.read_text())["fast_dev_run"][experiment]
            assert metrics == pytest.approx(reference, abs=1e-6)  # same names, same values
            return
        with pytest.raises(CheckpointMissingError) as err:
            train(cfg)
    finally:
        HydraConfig.instance().cfg = None
    message = str(err.value)
    assert "\n" not in message and err.value.hub_id in message
    assert err.value.hub_id in hub_ids, (err.value.hub_id, hub_ids)


# --- 2. a short run learns, and writes everything a run should ---------------------------------


@pytest.fixture(scope="module")
def trained_run(shapesworld, tmp_path_factory) -> tuple[Path, dict[str, float]]:
    """80 steps of the default config (csv + wandb loggers, offline) at a random-init learning rate."""
    out = tmp_path_factory.mktemp("trained")
    metrics = run_train([*data_overrides(shapesworld), *steps(80, 40), "optimizer.lr=1e-3"], out)
    return out, metrics


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


# --- 3. resume -----------------------------------------------------------------------------------

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


# --- 4. multirun ---------------------------------------------------------------------------------


def cli_train_args(data_dir: Path, log_dir: Path) -> list[str]:
    return [*data_overrides(data_dir), f"paths.log_dir={log_dir}", "logger=csv", "test=false"]


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


# --- 5. DDP --------------------------------------------------------------------------------------


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


# --- 6. predict and eval from the trained checkpoint --------------------------------------------


def test_predict_answers_a_question_from_the_checkpoint(trained_run, shapesworld, tmp_path):
    out, _ = trained_run
    image = shapesworld_root(shapesworld) / "images" / "test" / "test_000000.png"
    args = [
        f"ckpt={out / 'checkpoints' / 'last.ckpt'}",
        f"image={image}",
        "question=What shape is the red object?",
    ]
    proc = cli("vlm-predict", args, tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Q: What shape is the red object?\nA: " in proc.stdout


def test_predict_with_a_missing_image_fails_in_one_line(trained_run, tmp_path):
    out, _ = trained_run
    missing = tmp_path / "no_such.png"
    args = [f"ckpt={out / 'checkpoints' / 'last.ckpt'}", f"image={missing}", "question=What shape?"]
    proc = cli("vlm-predict", args, tmp_path, timeout=120)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"cannot read image '{missing}': ")


def test_where_read_diagnoses_the_trained_checkpoint(trained_run, shapesworld, capsys):
    """experiments/llava/where_read.py runs on a real checkpoint and the data set's own files."""
    spec = importlib.util.spec_from_file_location(
        "where_read", Path(__file__).parents[1] / "experiments/llava/where_read.py"
    )
    where_read = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(where_read)
    out, _ = trained_run
    root = shapesworld_root(shapesworld)
    where_read.main(str(out / "checkpoints" / "last.ckpt"), str(root))
    lines = capsys.readouterr().out.strip().splitlines()
    asked = Counter(r["qtype"] for r in json.loads((root / "llava_val.json").read_text()))
    want = [f"{qt} (n={asked[qt]})" for qt in where_read.QTYPES if asked[qt]]
    assert [line.split(":")[0] for line in lines[:-1]] == want
    for line in lines[:-1]:
        accs = re.fullmatch(r".*: all tokens (\S+), named only (\S+), all but named (\S+)", line).groups()
        assert all(0.0 <= float(a) <= 1.0 for a in accs)
    assert re.fullmatch(
        r"x from the centre token \(\d+ held-out objects\): R² -?\d+\.\d\d, half \d\.\d\d", lines[-1]
    )


def test_eval_of_the_best_checkpoint_reproduces_the_training_test_accuracy(trained_run, tmp_path):
    """``train`` tests the best checkpoint; ``vlm-eval`` on that file must print the same figure."""
    out, metrics = trained_run
    (best,) = (out / "checkpoints").glob("best-*.ckpt")
    proc = cli("vlm-eval", [f"ckpt={best}"], tmp_path, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = dict(re.findall(r"^(test/[\w/]+): ([\d.]+)$", proc.stdout, flags=re.M))
    assert float(printed["test/acc"]) == pytest.approx(metrics["test/acc"], abs=1e-4)


# --- 7. bad input through the CLI ----------------------------------------------------------------


def test_select_layer_past_the_encoder_depth_fails_with_the_reason(shapesworld, tmp_path):
    args = [*cli_train_args(shapesworld, tmp_path / "logs"), "family.model.select_layer=9"]
    proc = cli("vlm-train", args, tmp_path, timeout=120)
    assert proc.returncode != 0
    assert "select_layer=9 is outside the 2-block encoder 'tiny_clip' (valid: 1..2 or -1..-2)" in proc.stderr


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

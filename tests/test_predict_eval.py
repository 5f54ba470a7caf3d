"""``vlm-predict`` and ``vlm-eval`` as a user runs them, on the checkpoints of the shared short
trained run (``trained_run`` in conftest)."""

import re

import pytest
import torch
from runs import cli, load_ckpt, shapesworld_root

from vlm.core.lit_module import VLMLitModule


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
    assert proc.stderr.strip().splitlines() == [
        f"ConfigError: vlm-predict: image {missing} does not exist: give image=<an image file>"
    ]


def test_eval_of_the_best_checkpoint_reproduces_the_training_test_accuracy(trained_run, tmp_path):
    """``train`` tests the best checkpoint; ``vlm-eval`` on that file must print the same figure."""
    out, metrics = trained_run
    (best,) = (out / "checkpoints").glob("best-*.ckpt")
    proc = cli("vlm-eval", [f"ckpt={best}"], tmp_path, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = dict(re.findall(r"^(test/[\w/]+): ([\d.]+)$", proc.stdout, flags=re.M))
    assert float(printed["test/acc"]) == pytest.approx(metrics["test/acc"], abs=1e-4)
    assert (out / "eval" / "predictions" / "test_step0.jsonl").is_file()  # in the run, not the cwd
    assert not (tmp_path / "predictions").exists()


def test_a_checkpoint_names_its_format_and_only_a_lightning_module_class(trained_run, tmp_path):
    out, _ = trained_run
    ckpt = load_ckpt(out / "checkpoints" / "last.ckpt")
    assert ckpt["vlm"]["format"] == 2 and ckpt["vlm"]["module"] == "vlm.core.lit_module.VLMLitModule"
    assert ckpt["hyper_parameters"]["model"]["_target_"] == "vlm.core.llava.LlavaModel"
    old = tmp_path / "old.ckpt"
    torch.save({**ckpt, "vlm": {k: v for k, v in ckpt["vlm"].items() if k != "format"}}, old)
    with pytest.raises(
        ValueError, match=r"old\.ckpt is a vlm-lab checkpoint of format 1, this version reads format 2"
    ):
        VLMLitModule.from_checkpoint(old)
    other = tmp_path / "other.ckpt"
    torch.save({**ckpt, "vlm": {**ckpt["vlm"], "module": "collections.OrderedDict"}}, other)
    with pytest.raises(
        ValueError,
        match="'collections.OrderedDict' is not a known VLMLitModule: choose from vlm.core.lit_module.VLMLit",
    ):
        VLMLitModule.from_checkpoint(other)


def test_eval_reads_a_benchmark_file_given_on_the_command_line(trained_run, shapesworld, tmp_path):
    """``data.<key>=`` overrides the stored data config: ShapesWorld's test split read as a plain
    LLaVA JSON file scores what the stored config scores; with no test file, one line says which key."""
    out, _ = trained_run
    root = shapesworld_root(shapesworld)
    ckpt = f"ckpt={out / 'checkpoints' / 'last.ckpt'}"
    as_json = [ckpt, "data.source=llava_json", f"data.root={root}", f"data.image_folder={root}"]
    runs = [
        cli("vlm-eval", args, tmp_path, timeout=180)
        for args in ([ckpt], [*as_json, "data.test_json=llava_test.json"])
    ]
    stored, benchmark = (dict(re.findall(r"^(test/[\w/]+): ([\d.]+)$", p.stdout, flags=re.M)) for p in runs)
    assert all(p.returncode == 0 for p in runs), runs[-1].stderr[-3000:]
    assert "test/acc" in stored and benchmark == stored
    missing = cli("vlm-eval", [*as_json, "data.train_json=llava_train.json"], tmp_path, timeout=120)
    assert missing.returncode != 0 and "Traceback" not in missing.stderr
    assert (
        missing.stderr.strip().splitlines()[-1]
        == "vlm-eval: the data has no test split: set data.test_json=<file>"
    )

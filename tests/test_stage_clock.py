"""``timing.json`` (every run's wall time, part by part) and ``make bench-train``'s table."""

import json

import pytest
from runs import data_overrides, one_thread, run_train, steps

from vlm.bench.train_report import STAGES, report


@pytest.fixture(scope="module")
def timing(trained_run):
    return json.loads((trained_run[0] / "timing.json").read_text())


def test_every_run_splits_its_wall_time_into_parts_that_add_up(timing):
    parts = ("startup", "data", "compute", "validation", "test", "other")
    assert timing["steps"] == 80
    assert all(timing[f"{p}_s"] >= 0 for p in parts if p != "other") and timing["other_s"] > -1e-6
    assert sum(timing[f"{p}_s"] for p in parts) == pytest.approx(timing["total_s"])
    assert timing["compute_s"] > timing["data_s"] > 0 and timing["startup_s"] > 0
    assert timing["validation_s"] > 0 and timing["test_s"] > 0  # the run validates twice, then tests
    steps = [v["step"] for v in timing["validations"]]
    assert steps == [40, 80] and all(
        "val/acc" in v and 0 < v["elapsed_s"] < timing["total_s"] for v in timing["validations"]
    )


def test_the_bench_train_table_adds_the_stages_and_reads_the_final_test_accuracy(
    trained_run, tmp_path, timing
):
    for stage in STAGES:  # the same short run stands for each of the three stages
        (tmp_path / stage).symlink_to(trained_run[0])
    text = report(tmp_path, bar=0.0)
    assert f"| **all** | **{3 * timing['total_s']:.1f} s**" in text
    assert f"test accuracy at the end: {trained_run[1]['test/acc']:.4f}" in text
    assert "time to 0.0 test accuracy: **" in text and "first validation at val/acc >= 0.0: step 40" in text
    assert "not reached" in report(tmp_path, bar=1.01)


def test_stop_at_target_ends_the_fit_at_the_first_validation_above_the_bar_then_tests(shapesworld, tmp_path):
    """``callbacks=stop_at_target`` (make bench-train's stage 2): 24 steps planned, validation
    every 8; a bar every validation clears stops at step 8, and the run still tests; one no
    accuracy clears runs the whole plan."""
    args = [*data_overrides(shapesworld), *steps(24, 8), "callbacks=stop_at_target"]
    with one_thread():
        metrics = run_train([*args, "callbacks.stop_at_target.stopping_threshold=-1.0"], tmp_path / "stop")
    timing = json.loads((tmp_path / "stop" / "timing.json").read_text())
    assert timing["steps"] == 8 and [v["step"] for v in timing["validations"]] == [8]
    assert "test/acc" in metrics and timing["test_s"] > 0
    with one_thread():
        run_train([*args, "callbacks.stop_at_target.stopping_threshold=2.0"], tmp_path / "never")
    assert json.loads((tmp_path / "never" / "timing.json").read_text())["steps"] == 24

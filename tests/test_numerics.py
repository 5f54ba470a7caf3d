"""The default run's numerics are pinned: its first 50 stage-1 training losses equal the stored
reference (``tests/reference/numerics.json``, written by ``python tests/numerics.py``) to 1e-6.
Every tiny experiment's ``fast_dev_run`` metrics are pinned the same way in
``test_train_cli.py::test_experiment_fast_dev_run``."""

import json

import pytest
from numerics import REFERENCE, STAGE1_STEPS, stage1_overrides
from runs import metrics_rows, one_thread, per_step, run_train


def test_the_default_runs_first_stage1_losses_equal_the_reference(tmp_path):
    with one_thread():
        run_train(stage1_overrides(tmp_path / "data"), tmp_path / "stage1")
    losses = per_step(metrics_rows(tmp_path / "stage1"), "train/loss")
    assert sorted(losses) == list(range(STAGE1_STEPS))
    reference = json.loads(REFERENCE.read_text())["stage1_losses"]
    assert [losses[s] for s in range(STAGE1_STEPS)] == pytest.approx(reference, abs=1e-6)

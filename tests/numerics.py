"""The figures a refactor must not move: ``fast_dev_run`` metrics of every tiny experiment, and
the default run's first 50 stage-1 training losses (``make train``'s ``llava_shapes_stage1``).

``tests/reference/numerics.json`` holds them as the code computed them when it was written;
``python tests/numerics.py [experiments|stage1]`` writes them anew (only when a change is meant
to move them, and saying so).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

REFERENCE = Path(__file__).parent / "reference" / "numerics.json"
STAGE1_STEPS = 50
# Experiments whose parts are tiny (the others load hub weights, which a test machine lacks).
TINY_EXPERIMENTS = (
    "calm_shapes",
    "calm_shapes_clip_only",
    "dense_shapes",
    "dense_shapes_stage2",
    "llava_shapes",
    "llava_shapes_stage1",
    "llava_shapes_stage1b",
    "mlvf_shapes",
    "qformer_shapes",
    "sam_shapes",
)


def fast_dev_run_overrides(experiment: str, data_dir: Path) -> list[str]:
    """One train, val and test batch of ``experiment`` on the shared tiny ShapesWorld."""
    from runs import experiment_overrides

    return experiment_overrides(experiment, data_dir, "++trainer.fast_dev_run=true", "logger=csv")


def stage1_overrides(data_dir: Path) -> list[str]:
    """The default run's stage 1 on its own full ShapesWorld, cut to its first 50 steps."""
    return [
        "experiment=llava_shapes_stage1",
        f"paths.data_dir={data_dir}",
        f"trainer.max_steps={STAGE1_STEPS}",
        "trainer.log_every_n_steps=1",
        "logger=csv",
    ]


def scalars(metrics: dict[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in sorted(metrics.items())}


def record(what: str) -> None:
    from runs import metrics_rows, one_thread, per_step, run_train

    data = json.loads(REFERENCE.read_text()) if REFERENCE.exists() else {}
    with tempfile.TemporaryDirectory() as tmp, one_thread():
        tmp = Path(tmp)
        if what == "experiments":
            runs = {e: run_train(fast_dev_run_overrides(e, tmp / "data"), tmp / e) for e in TINY_EXPERIMENTS}
            data["fast_dev_run"] = {e: scalars(m) for e, m in runs.items()}
        else:
            run_train(stage1_overrides(tmp / "data"), tmp / "stage1")
            losses = per_step(metrics_rows(tmp / "stage1"), "train/loss")
            data["stage1_losses"] = [losses[s] for s in range(STAGE1_STEPS)]
    REFERENCE.parent.mkdir(exist_ok=True)
    REFERENCE.write_text(json.dumps(data, indent=1) + "\n")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    sys.path.insert(0, str(Path(__file__).parent / "apps"))
    for what in sys.argv[1:] or ["experiments", "stage1"]:
        record(what)

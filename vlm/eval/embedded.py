"""A checkpoint's own ShapesWorld test split as a published benchmark: with no
``benchmark.root``, ``vlm-eval benchmark=vqav2|gqa|pope|mme`` scores a ShapesWorld-trained model
on the files its data set writes in that benchmark's layout (generated first if missing), through
the same reader and official scorer as the real benchmark."""

from __future__ import annotations

from pathlib import Path

import hydra

from vlm.data.shapesworld import benchmark_root
from vlm.data.shapesworld.benchmarks import SPLIT
from vlm.eval.base import BenchmarkError

SPLITS = {"vqav2": SPLIT, "gqa": SPLIT, "pope": "all", "mme": None}  # what ShapesWorld writes


def embedded(name: str, data_config: dict | None) -> tuple[Path, str | None]:
    """(root, split) of benchmark ``name`` in the ShapesWorld of ``data_config``."""
    if name not in SPLITS:
        raise BenchmarkError(
            f"ShapesWorld has no {name} form (it writes {', '.join(SPLITS)}): set benchmark.root=<folder>"
        )
    if not data_config or data_config.get("source") != "shapesworld":
        raise BenchmarkError(
            f"the checkpoint was not trained on ShapesWorld, so there is no embedded {name}: "
            "set benchmark.root=<folder>"
        )
    datamodule = hydra.utils.instantiate(data_config)
    datamodule.prepare_data()  # a no-op when the data set on disk matches
    return benchmark_root(datamodule.hparams.root) / name, SPLITS[name]

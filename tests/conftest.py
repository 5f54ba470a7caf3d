"""Shared test setup and fixtures: no hub downloads, few threads, a fresh temp workspace, the
shared ShapesWorld data sets and the short trained run that several test files query."""

import os
import sys
from pathlib import Path

import hydra
import pytest
from hydra.core.hydra_config import HydraConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports huggingface_hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent / "apps"))  # train_probes, for Hydra _target_ lookups

from runs import compose_run, data_overrides, one_thread, run_train, steps  # noqa: E402

from vlm.data.shapesworld import ShapesWorldConfig, generate  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """Skip `gpu`-marked tests when no CUDA device is visible (torch imported only if needed)."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in gpu_items:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shapesworld(tmp_path_factory) -> Path:
    """``paths.data_dir`` holding the tiny ShapesWorld, generated once through the data config."""
    data_dir = tmp_path_factory.mktemp("data")
    cfg = compose_run(data_overrides(data_dir), tmp_path_factory.mktemp("gen"))
    try:
        hydra.utils.instantiate(cfg.data).prepare_data()
    finally:
        HydraConfig.instance().cfg = None
    return data_dir


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for a test module's in-process runs (``runs.one_thread``); a module
    opts in with ``pytestmark = pytest.mark.usefixtures("single_thread")``."""
    with one_thread():
        yield


@pytest.fixture(scope="module")
def world(request, tmp_path_factory) -> Path:
    """A ShapesWorld generated once per test module from that module's ``WORLD`` options."""
    return generate(ShapesWorldConfig(root=str(tmp_path_factory.mktemp("sw")), **request.module.WORLD))


@pytest.fixture(scope="session")
def trained_run(shapesworld, tmp_path_factory) -> tuple[Path, dict[str, float]]:
    """80 steps of the default config (csv + wandb loggers, offline) at a random-init learning
    rate: the checkpoints that predict, eval and the analysis scripts are tested on."""
    out = tmp_path_factory.mktemp("trained")
    with one_thread():
        metrics = run_train([*data_overrides(shapesworld), *steps(80, 40), "optimizer.lr=1e-3"], out)
    return out, metrics

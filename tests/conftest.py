"""Shared test setup: no hub downloads, few threads, a fresh temp workspace."""

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

from runs import compose_run, data_overrides  # noqa: E402


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

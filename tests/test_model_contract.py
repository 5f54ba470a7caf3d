"""The model contract (``vlm.core.model``) on every tiny experiment's model as ``vlm-train``
builds it: the parts hold every parameter exactly once and each part's blocks lie inside it;
what no output depends on stays frozen whatever the recipe; and one training step gives every
parameter that trains a gradient, which is what DDP needs."""

from collections import Counter

import pytest
from hydra.core.hydra_config import HydraConfig
from numerics import TINY_EXPERIMENTS
from runs import compose_run, experiment_overrides

from vlm.cli.train import build

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("experiment", TINY_EXPERIMENTS)
def test_parts_unused_modules_and_gradients_keep_the_contract(experiment, shapesworld, tmp_path):
    try:
        datamodule, _, module = build(compose_run(experiment_overrides(experiment, shapesworld), tmp_path))
    finally:
        HydraConfig.instance().cfg = None
    model = module.model
    parts = model.parts()
    owners = Counter(id(p) for part in parts.values() for p in part.parameters())
    assert set(owners) == {id(p) for p in model.parameters()} and set(owners.values()) == {1}
    for name, part in parts.items():
        blocks = model.blocks(name)
        inside = {id(p) for p in part.parameters()}
        assert blocks is None or {id(p) for p in blocks.parameters()} <= inside, name
    unused = [p for m in model.unused() for p in m.parameters()]
    assert not any(p.requires_grad for p in unused)

    datamodule.setup("fit")
    module.train()
    module(next(iter(datamodule.train_dataloader())))["loss"].backward()
    missing = [n for n, p in module.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []


def test_the_default_experiment_trains_its_tower_but_not_the_block_past_the_one_read(shapesworld, tmp_path):
    """``llava_shapes`` trains the tower (full); its last block lies past ``select_layer=-2``."""
    try:
        _, _, module = build(compose_run(experiment_overrides("llava_shapes", shapesworld), tmp_path))
    finally:
        HydraConfig.instance().cfg = None
    blocks = module.model.vision_tower.blocks
    assert module.model.select_index == len(blocks) - 1
    assert [m for m in module.model.unused()] == [blocks[-1]]
    assert all(p.requires_grad for b in blocks[:-1] for p in b.parameters())
    assert not any(p.requires_grad for p in blocks[-1].parameters())

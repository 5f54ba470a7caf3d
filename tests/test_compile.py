"""``family.compile``: regional ``torch.compile`` of the named parts' blocks. The compiled run
computes what the eager one does (same losses, step for step), compiles exactly the blocks of
the named parts into one graph per part, decodes eager, and keeps CALM's gradients flowing
through checkpointed, compiled blocks."""

import json

import pytest
import torch
from runs import data_overrides, metrics_rows, one_thread, per_step, run_train, steps

from vlm.runtime.errors import ConfigError

COMPILED = "+callbacks.compiled._target_=train_probes.Compiled"


def run(experiment, shapesworld, tmp_path, *extra):
    overrides = [
        f"experiment={experiment}", *data_overrides(shapesworld), *steps(3, 3), "logger=csv", "test=false",
        "seed=0", *extra,
    ]  # fmt: skip
    with one_thread():
        run_train(overrides, tmp_path)
    return per_step(metrics_rows(tmp_path), "train/loss")


def compiled(run_dir) -> list[str]:
    return json.loads((run_dir / "compiled_rank0.json").read_text())


def test_compiled_blocks_compute_what_the_eager_run_does(shapesworld, tmp_path):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    eager = run("llava_shapes", shapesworld, tmp_path / "eager", COMPILED)
    parts = ["family.compile.parts=[vision_tower,llm]", "family.compile.backend=eager"]
    loss = run("llava_shapes", shapesworld, tmp_path / "compiled", *parts, COMPILED)
    assert compiled(tmp_path / "eager") == []
    names = compiled(tmp_path / "compiled")
    tower = [n for n in names if n.startswith("model.vision_tower.")]
    llm = [n for n in names if n.startswith("model.llm.")]
    assert len(tower) == 3 and len(llm) == 5 and len(names) == 8  # the 3 tower and 5 decoder blocks
    assert all(n.rsplit(".", 1)[-1].isdigit() for n in names)  # blocks, not the parts around them
    # dynamo really traced them, and the blocks of a part share one graph per grad mode (train
    # steps, validation loss): 8 blocks, 2 parts -> 4 graphs; decoding in validation adds none
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 4
    assert loss == eager


def test_calm_modules_train_through_compiled_checkpointed_blocks(shapesworld, tmp_path):
    hashes = [
        "+callbacks.parts._target_=train_probes.PartHashes",
        "+callbacks.parts.parts={calm:model.vision_tower.calm,anchor:model.vision_tower.anchor}",
    ]
    run(
        "calm_shapes", shapesworld, tmp_path, "family.compile.parts=[anchor,augmenting,calm]",
        "family.compile.backend=eager", "family.gradient_checkpointing=true", COMPILED, *hashes,
    )  # fmt: skip
    names = compiled(tmp_path)
    assert any(".calm." in n for n in names) and any(".augmenting." in n for n in names)
    record = json.loads((tmp_path / "parts_rank0.json").read_text())
    assert record["start"]["calm"] != record["end"]["calm"]
    assert record["start"]["anchor"] == record["end"]["anchor"]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("family.compile.parts=[vision_towr]", r"family.compile.parts has unknown parts \['vision_towr'\]"),
        ("+family.compile.modes=max-autotune", r"family.compile has unknown keys \['modes'\]"),
    ],
)
def test_compile_config_errors_name_the_key(shapesworld, tmp_path, override, message):
    """Said by validation, in one line, before the data or the model exist."""
    with pytest.raises(ConfigError, match=message):
        run("llava_shapes", shapesworld, tmp_path, override)


@pytest.mark.slow
def test_inductor_on_cpu_matches_eager(shapesworld, tmp_path):
    """The real backend (C++ kernels on the CPU): fused kernels round differently, so close,
    not equal."""
    eager = run("llava_shapes", shapesworld, tmp_path / "eager")
    loss = run("llava_shapes", shapesworld, tmp_path / "inductor", "family.compile.parts=[llm]")
    assert loss.keys() == eager.keys()
    assert all(abs(loss[s] - eager[s]) < 1e-3 for s in eager), (loss, eager)

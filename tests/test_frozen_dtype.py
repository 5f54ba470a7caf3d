"""``stage.frozen_dtype``: frozen weights are stored in bf16 for the fit while trained weights
stay fp32, the run trains, and checkpoints still load into an fp32 module (CALM: two frozen
towers around trained modules, the family where it matters most)."""

import json

import pytest
import torch
from runs import data_overrides, load_ckpt, one_thread, run_train, steps

from vlm.core.lit_module import VLMLitModule

PROBES = [
    "+callbacks.dtypes._target_=train_probes.ParamDtypes",
    "+callbacks.parts._target_=train_probes.PartHashes",
    "+callbacks.parts.parts={calm:model.vision_tower.calm,connector:model.connector}",
]


def calm_run(shapesworld, tmp_path, *extra):
    overrides = [
        "experiment=calm_shapes", *data_overrides(shapesworld), *steps(3, 3), "logger=csv", "test=false",
        "trainer.precision=bf16-mixed", *extra,
    ]  # fmt: skip
    with one_thread():
        return run_train(overrides, tmp_path)


def test_frozen_weights_are_bf16_inside_the_fit_and_trained_ones_fp32(shapesworld, tmp_path):
    calm_run(shapesworld, tmp_path, "stage.frozen_dtype=bf16", *PROBES)
    record = json.loads((tmp_path / "dtypes_rank0.json").read_text())
    inside = record["inside"]
    frozen = {n: d for n, (d, grad) in inside.items() if not grad}
    trained = {n: d for n, (d, grad) in inside.items() if grad}
    assert any(".anchor." in n for n in frozen) and any(".augmenting." in n for n in frozen)
    assert any(".calm." in n for n in trained) and any("connector" in n for n in trained)
    assert set(frozen.values()) == {"torch.bfloat16"}
    assert set(trained.values()) == {"torch.float32"}
    assert set(record["after"].values()) == {"torch.float32"}  # fp32 again for eval and export
    hashes = json.loads((tmp_path / "parts_rank0.json").read_text())
    assert hashes["start"]["calm"] != hashes["end"]["calm"]  # the modules still train

    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    state = load_ckpt(ckpt)["state_dict"]
    assert {state[n].dtype for n in frozen} == {torch.bfloat16}  # half the bytes on disk too
    module = VLMLitModule.from_checkpoint(ckpt)
    assert {p.dtype for p in module.parameters()} == {torch.float32}
    name = next(iter(frozen))
    assert torch.equal(module.get_parameter(name), state[name].float())


def test_without_frozen_dtype_everything_stays_fp32(shapesworld, tmp_path):
    calm_run(shapesworld, tmp_path, PROBES[0])
    inside = json.loads((tmp_path / "dtypes_rank0.json").read_text())["inside"]
    assert {d for d, _ in inside.values()} == {"torch.float32"}


def test_frozen_dtype_needs_a_mixed_precision(shapesworld, tmp_path):
    overrides = ["stage.frozen_dtype=bf16", "trainer.precision=32-true"]
    needs = r"stage.frozen_dtype=bf16 needs a mixed trainer.precision.*got 32-true"
    with pytest.raises(ValueError, match=needs):
        calm_run(shapesworld, tmp_path, *overrides)


def test_an_unknown_frozen_dtype_is_named(shapesworld, tmp_path):
    with pytest.raises(ValueError, match=r"stage.frozen_dtype='int8': choose from bf16, fp16 or null"):
        calm_run(shapesworld, tmp_path, "stage.frozen_dtype=int8")


@pytest.mark.parametrize(
    "family",
    [
        ["stage=pretrain"],  # llava: tower and LLM frozen
        ["stage=finetune", "stage.tune.llm.type=lora"],  # fp32 adapters on bf16 base weights
        ["experiment=mlvf_shapes", "fusion=I_M", "stage=pretrain"],  # hooks inside a bf16 LLM
        ["experiment=qformer_shapes"],  # frozen CLIP and the frozen part of the decoder
    ],
    ids=["llava", "llava_lora", "layer_fusion_I_M", "qformer_captioner"],
)
def test_every_family_trains_with_bf16_frozen_weights(family, shapesworld, tmp_path):
    overrides = [
        *family, *data_overrides(shapesworld), *steps(2, 2), "logger=csv", "test=false",
        "trainer.precision=bf16-mixed", "stage.frozen_dtype=bf16", PROBES[0],
    ]  # fmt: skip
    with one_thread():
        metrics = run_train(overrides, tmp_path)
    inside = json.loads((tmp_path / "dtypes_rank0.json").read_text())["inside"]
    assert {d for d, grad in inside.values() if not grad} == {"torch.bfloat16"}
    assert {d for d, grad in inside.values() if grad} == {"torch.float32"}
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))

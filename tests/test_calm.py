"""CALM: where the modules sit, that the fused state flows on, that gradients reach every
module (with and without gradient checkpointing) while the towers stay frozen, and that each
tower gets its own preprocessing. The last tests run ``train`` with ``experiment=calm_shapes``."""

import json
from collections import Counter

import hydra
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import InstantiationException
from omegaconf import OmegaConf
from runs import cli, data_overrides, metrics_rows, run_train, steps, vqa_batch

from vlm.cli.build import build_module
from vlm.cli.common import CONFIG_DIR
from vlm.cli.common import PROJECT_ROOT as ROOT
from vlm.core.zoo.encoders import build_vision_tower
from vlm.families.calm.composition import CompositionModule, attention_entropy
from vlm.families.calm.layers import augmenting_layer, composition_layers
from vlm.families.calm.tower import CalmTower

pytestmark = pytest.mark.usefixtures("single_thread")


def anchor_tower(depth: int = 4):
    torch.manual_seed(0)
    return build_vision_tower(
        "tiny_clip", image_size=32, patch_size=8, hidden_size=48, intermediate_size=96,
        num_hidden_layers=depth, num_attention_heads=4,
    )  # fmt: skip


def augmenting_tower(depth: int = 2, patch: int = 4):
    torch.manual_seed(1)
    return build_vision_tower("tiny_dinov2", image_size=32, patch_size=patch, num_hidden_layers=depth)


def pixels(batch: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return {
        "anchor": torch.randn(batch, 3, 32, 32, generator=g),
        "augmenting": torch.randn(batch, 3, 32, 32, generator=g),
    }


def frozen(*towers):
    for t in towers:
        t.requires_grad_(False).eval()
    return towers


# --- where the modules sit ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "depth, n, layers",
    [
        (24, 4, [6, 12, 18, 24]),
        (24, 2, [12, 24]),
        (24, 8, [3, 6, 9, 12, 15, 18, 21, 24]),
        (12, 4, [3, 6, 9, 12]),
    ],
)
def test_composition_layers_are_uniform_one_based_blocks(depth, n, layers):
    assert composition_layers(depth, n) == layers


def test_a_layer_count_that_does_not_divide_the_depth_names_the_choices():
    with pytest.raises(
        ValueError, match=r"num_layers=5 does not divide the anchor's 24 blocks.*\[1, 2, 3, 4, 6, 8, 12, 24\]"
    ):
        composition_layers(24, 5)


def test_towers_of_different_depths_pair_layers_proportionally():
    assert [augmenting_layer(layer, 24, 12) for layer in (6, 12, 18, 24)] == [3, 6, 9, 12]
    assert [augmenting_layer(layer, 24, 24) for layer in (6, 12, 18, 24)] == [6, 12, 18, 24]
    assert [augmenting_layer(layer, 12, 24) for layer in (3, 6, 9, 12)] == [6, 12, 18, 24]
    assert augmenting_layer(1, 24, 4) == 1  # never block 0 (the embeddings)


def test_modules_past_the_output_layer_are_not_built():
    anchor, aug = frozen(anchor_tower(4), augmenting_tower())
    tower = CalmTower(anchor, aug, num_layers=4, output_layer=3)
    assert tower.layers == [1, 2, 3] and tower.skipped == [4]
    assert sorted(tower.calm) == ["1", "2", "3"]


# --- the fused state replaces the anchor's ------------------------------------------------------


def test_gated_attention_at_init_is_the_anchor_alone_and_fusion_changes_later_states():
    anchor, aug = frozen(anchor_tower(4), augmenting_tower())
    tower = CalmTower(anchor, aug, num_layers=2, fusion="gated_attention", num_heads=4)
    with torch.no_grad():
        alone = anchor.states(pixels()["anchor"], 4)
        fused = tower.states(pixels(), 4)
        assert all(torch.equal(a, b) for a, b in zip(alone, fused, strict=True))
        tower.calm["2"].gate.fill_(0.5)
        fused = tower.states(pixels(), 4)
    assert all(torch.equal(alone[i], fused[i]) for i in range(2))  # before the first module
    assert not torch.allclose(alone[2], fused[2])
    # the fused state is what block 3 reads: h3 = block_3(fused h2), not block_3(anchor's h2)
    with torch.no_grad():
        assert torch.equal(fused[3], anchor.run_block(2, fused[2]))


@pytest.mark.parametrize("fusion", ["cross_attention", "simple_add"])
def test_fusions_apply_residual_and_layernorm(fusion):
    module = CompositionModule(48, 64, fusion=fusion, num_heads=4, prefix=1, aug_prefix=1)
    h, aug = torch.randn(2, 17, 48) * 5, torch.randn(2, 65, 64)  # 4x4 anchor grid, 8x8 augmenting
    out = module(h, aug)
    assert out.shape == h.shape
    torch.testing.assert_close(out.mean(-1), torch.zeros(2, 17), atol=1e-5, rtol=0)  # LayerNorm'd
    assert not torch.allclose(out, module.norm(h))  # the augmenting state contributed


def test_simple_add_resamples_the_augmenting_grid_onto_the_anchors():
    module = CompositionModule(4, 4, fusion="simple_add", num_heads=1, prefix=1, aug_prefix=1)
    with torch.no_grad():
        module.mapping.weight.copy_(torch.eye(4))
        module.mapping.bias.zero_()
    a = torch.zeros(1, 1 + 64, 4)
    a[0, 0] = 7.0  # class token
    a[0, 1:] = torch.arange(8).repeat(8)[:, None].float()  # value = column index on an 8x8 grid
    out = module.resample(module.mapping(a), 1 + 16)
    assert torch.equal(out[0, 0], torch.full((4,), 7.0))
    cols = out[0, 1:, 0].reshape(4, 4)
    assert torch.equal(cols[0], cols[3]) and (cols[:, 1:] > cols[:, :-1]).all()  # left to right kept


def test_heads_that_do_not_divide_the_width_fail_clearly():
    with pytest.raises(ValueError, match="num_heads=12 does not divide the anchor width 64"):
        CompositionModule(64, 64, num_heads=12)


def test_attention_entropy_is_zero_for_one_hot_and_one_for_uniform_rows():
    one_hot = torch.zeros(1, 2, 3, 5)
    one_hot[..., 0] = 1
    assert float(attention_entropy(one_hot)) == pytest.approx(0.0, abs=1e-6)
    assert float(attention_entropy(torch.full((1, 2, 3, 5), 0.2))) == pytest.approx(1.0)


# --- gradients and freezing through the whole VLM -----------------------------------------------


def calm_module(*overrides: str):
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                "experiment=calm_shapes", "encoder.num_hidden_layers=4", "family.model.calm.num_layers=2",
                "family.model.select_layer=-1", *overrides,
            ],
        )  # fmt: skip
    tokenizer = hydra.utils.instantiate(cfg.tokenizer, corpus=["a red circle left of a blue square"] * 20)
    torch.manual_seed(0)
    return build_module(cfg, tokenizer)


def calm_grads(module) -> dict[str, torch.Tensor]:
    module.train()
    module(vqa_batch(module))["loss"].backward()
    return {n: p.grad for n, p in module.model.vision_tower.calm.named_parameters()}


def forward_counts(module) -> Counter:
    """Forward calls of each composition module, from now on."""
    counts: Counter = Counter()
    for layer, m in module.model.vision_tower.calm.items():
        m.register_forward_pre_hook(lambda _m, _args, layer=layer: counts.update([layer]))
    return counts


@pytest.mark.parametrize("fusion", ["cross_attention", "gated_attention", "simple_add"])
@pytest.mark.parametrize("mapping", ["linear", "mlp", "attention"])
def test_every_calm_parameter_gets_the_same_gradient_with_and_without_checkpointing(fusion, mapping):
    """Same gradients either way, and with the flag each module's forward is run again in the
    backward pass: checkpointing that silently did nothing would pass the first check alone."""
    grads, calls = {}, {}
    for ckpt in (False, True):
        module = calm_module(
            f"family.model.calm.fusion={fusion}", f"family.model.calm.mapping={mapping}",
            f"family.gradient_checkpointing={ckpt}", "family.model.calm.num_heads=4",
        )  # fmt: skip
        if fusion == "gated_attention":  # tanh(0) = 0 passes no gradient to the branch
            for m in module.model.vision_tower.calm.values():
                m.gate.data.fill_(0.3)
        assert module.model.vision_tower.gradient_checkpointing is ckpt
        calls[ckpt] = forward_counts(module)
        grads[ckpt] = calm_grads(module)
    assert calls == {False: {"2": 1, "4": 1}, True: {"2": 2, "4": 2}}  # modules at blocks 2 and 4
    assert grads[False].keys() == grads[True].keys()
    for name, g in grads[True].items():
        assert g is not None and g.abs().sum() > 0, name
        torch.testing.assert_close(g, grads[False][name], rtol=1e-4, atol=1e-7)


def test_gated_attention_at_init_trains_the_gate_first():
    grads = calm_grads(
        calm_module("family.model.calm.fusion=gated_attention", "family.model.calm.num_heads=4")
    )
    assert all(grads[f"{layer}.gate"].abs() > 0 for layer in ("2", "4"))
    assert all(g is None or g.abs().sum() == 0 for n, g in grads.items() if "attn" in n)


def test_tune_vision_tower_calm_trains_only_the_modules_and_keeps_towers_in_eval():
    module = calm_module("stage.tune.vision_tower.type=calm", "stage.tune.llm.type=frozen")
    tower = module.model.vision_tower
    trainable = {n.split(".")[0] for n, p in module.model.named_parameters() if p.requires_grad}
    assert trainable == {"vision_tower", "connector"}
    assert all(p.requires_grad for p in tower.calm.parameters())
    assert not any(p.requires_grad for p in [*tower.anchor.parameters(), *tower.augmenting.parameters()])
    module.train()
    assert tower.calm.training and not tower.anchor.training and not tower.augmenting.training


def test_tune_vision_tower_frozen_fixes_the_modules_too_and_a_named_part_overrides_it():
    module = calm_module("stage.tune.vision_tower.type=frozen")
    assert not any(p.requires_grad for p in module.model.vision_tower.parameters())
    module.apply_recipe(
        {"vision_tower": {"type": "frozen"}, "calm": {"type": "full"}, "connector": {"type": "full"}}
    )
    assert all(p.requires_grad for p in module.model.vision_tower.calm.parameters())
    assert not any(p.requires_grad for p in module.model.vision_tower.anchor.parameters())
    with pytest.raises(InstantiationException, match="tune.vision_tower=.lora. for CALM"):
        calm_module("stage.tune.vision_tower.type=lora")


def test_the_parameter_table_splits_anchor_augmenting_calm_connector_llm():
    rows = {r["component"]: r for r in calm_module().parameter_rows()}
    assert list(rows) == ["anchor", "augmenting", "calm", "connector", "llm", "all"]
    assert rows["anchor"]["trainable"] == rows["augmenting"]["trainable"] == 0
    assert rows["calm"]["trainable"] == rows["calm"]["total"] > 0


# --- preprocessing ------------------------------------------------------------------------------


def test_each_tower_gets_its_own_size_mean_and_std():
    module = calm_module("augmenting.image_size=28", "augmenting.patch_size=7")
    batch = vqa_batch(module)
    px = batch["pixel_values"]
    assert px["anchor"].shape[-1] == 32 and px["augmenting"].shape[-1] == 28
    red = torch.tensor([1.0, 0.0, 0.0])  # PIL "red": CLIP and ImageNet statistics normalise it differently
    clip = (red - torch.tensor([0.48145466, 0.4578275, 0.40821073])) / torch.tensor(
        [0.26862954, 0.26130258, 0.27577711]
    )
    imagenet = (red - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(px["anchor"][0, :, 5, 5], clip)
    torch.testing.assert_close(px["augmenting"][0, :, 5, 5], imagenet)


def test_match_grid_rebuilds_the_augmenting_tower_for_the_anchors_field_of_view():
    module = calm_module("augmenting.patch_size=8", "augmenting.image_size=32")
    assert module.model.vision_tower.augmenting.num_patches == 16  # 4x4 like the anchor: nothing to do
    module = calm_module(
        "augmenting.patch_size=4", "family.model.calm.match_grid=true", "encoder.patch_size=4"
    )
    aug = module.model.vision_tower.augmenting
    assert aug.num_patches == module.model.vision_tower.anchor.num_patches == 64
    module = calm_module(
        "augmenting.patch_size=8", "family.model.calm.match_grid=true", "encoder.patch_size=4"
    )
    aug = module.model.vision_tower.augmenting
    assert (aug.num_patches, aug.image_spec.size) == (64, 64)  # 8x8 grid of 8-px patches: 64 px
    assert vqa_batch(module)["pixel_values"]["augmenting"].shape[-1] == 64


# --- the real entry point -----------------------------------------------------------------------


@pytest.mark.parametrize("tower_tune", ["calm", "frozen"])
def test_calm_shapes_trains_what_the_recipe_says_and_logs_module_health(tower_tune, shapesworld, tmp_path):
    probe = [
        "+callbacks.parts._target_=train_probes.PartHashes",
        "+callbacks.parts.parts={anchor:model.vision_tower.anchor,augmenting:model.vision_tower.augmenting,"
        "calm:model.vision_tower.calm,connector:model.connector}",
    ]
    overrides = [
        "experiment=calm_shapes", *data_overrides(shapesworld), *steps(4, 4), *probe, "logger=csv",
        f"stage.tune.vision_tower.type={tower_tune}", "family.monitor_every=2", "test=false",
    ]  # fmt: skip
    run_train(overrides, tmp_path)
    hashes = json.loads((tmp_path / "parts_rank0.json").read_text())
    changed = {k for k in hashes["start"] if hashes["start"][k] != hashes["end"][k]}
    assert changed == ({"calm", "connector"} if tower_tune == "calm" else {"connector"})
    rows = metrics_rows(tmp_path)
    logged = {k for r in rows for k, v in r.items() if v}
    modules = ["6", "12", "18"]  # n=4 on 24 blocks, output layer 23: no module at 24
    assert {f"calm/entropy_{m}" for m in modules} <= logged
    grad = [float(r[f"calm/grad_norm_{m}"]) for r in rows for m in modules if r.get(f"calm/grad_norm_{m}")]
    assert len(grad) == 2 * len(modules)  # steps 0 and 2
    assert all(g > 0 for g in grad) if tower_tune == "calm" else all(g == 0 for g in grad)


def test_the_sweep_file_defines_the_48_job_grid_over_calm_shapes(tmp_path):
    proc = cli(
        "vlm-train",
        ["--config-dir", "sweeps", "--config-name", "calm_layers_heads", "--cfg", "all"],
        ROOT,
        120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    cfg = OmegaConf.create(proc.stdout)
    params = cfg.hydra.sweeper.params
    grid = [len(str(v).split(",")) for v in params.values()]
    assert dict(zip(params, grid, strict=True)) == {
        "family.model.calm.num_layers": 4, "family.model.calm.num_heads": 4, "family.model.calm.fusion": 3,
    }  # fmt: skip
    assert cfg.hydra.runtime.choices.experiment == "calm_shapes" and cfg.task_name == "sweep_calm"

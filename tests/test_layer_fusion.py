"""Layer fusion: the layer-index tables (24, 27 and 12 blocks; LLM targets), each strategy's
shapes, zero-init modules that leave plain LLaVA's output exactly unchanged, internal injection
at prefill and not at decode, gradients with and without checkpointing, the stage recipes, a
few falling-loss steps for every strategy x layer set, and the real ``train`` entry point."""

import json
from pathlib import Path

import hydra
import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from omegaconf import OmegaConf
from PIL import Image
from runs import (
    cli,
    compose_run,
    data_overrides,
    encode_batch,
    metrics_rows,
    on_cuda,
    open_gates,
    run_train,
    steps,
    vqa_batch,
)

from vlm.cli.build import build_module
from vlm.cli.common import CONFIG_DIR, quote_numeric_options
from vlm.cli.common import PROJECT_ROOT as ROOT
from vlm.core.lit_module import VLMLitModule
from vlm.core.llava import LlavaModel
from vlm.families.layer_fusion.layers import llm_target, resolve
from vlm.runtime.identity import run_identity

SETS = ["18", "3-18", "3-18-23", "former", "latter", "all"]
STRATEGIES = ["E_D", "E_M", "I_D", "I_M"]


pytestmark = pytest.mark.usefixtures("single_thread")


def layer_set(name: str, depth: int):
    cfg = yaml.safe_load((Path(CONFIG_DIR) / "layers" / f"{name}.yaml").read_text())
    return resolve(cfg["name"], cfg["blocks"], depth, cfg["reference"])


# --- the tables ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("depth", "table"),
    [
        (24, {"18": [18], "3-18": [3, 18], "3-18-23": [3, 18, 23],
              "former": [(1, 12)], "latter": [(13, 24)], "all": [(1, 24)]}),
        (27, {"18": [20], "3-18": [3, 20], "3-18-23": [3, 20, 26],
              "former": [(1, 14)], "latter": [(15, 27)], "all": [(1, 27)]}),
        (12, {"18": [9], "3-18": [2, 9], "3-18-23": [2, 9, 12],
              "former": [(1, 6)], "latter": [(7, 12)], "all": [(1, 12)]}),
    ],
)  # fmt: skip
def test_layer_sets_map_proportionally_and_halves_still_tile_the_encoder(depth, table):
    for name, expected in table.items():
        groups = layer_set(name, depth).groups
        spans = [
            (g[0], g[-1]) if isinstance(e, tuple) else g[0] for g, e in zip(groups, expected, strict=True)
        ]
        assert spans == expected, name
        assert all(list(g) == list(range(g[0], g[-1] + 1)) for g in groups)
    former, latter = layer_set("former", depth).blocks, layer_set("latter", depth).blocks
    assert former + latter == list(range(1, depth + 1))


def test_llm_targets_sit_at_the_same_relative_depth():
    assert [llm_target(b, 24, 24) for b in (3, 18, 23)] == [2, 17, 22]
    assert [llm_target(b, 27, 24) for b in layer_set("3-18-23", 27).blocks] == [1, 16, 22]
    assert [llm_target(b, 24, 22) for b in (1, 3, 18, 23, 24)] == [0, 1, 15, 20, 21]  # TinyLlama
    former = {llm_target(b, 24, 24) for b in layer_set("former", 24).blocks}
    latter = {llm_target(b, 24, 24) for b in layer_set("latter", 24).blocks}
    assert former == set(range(12)) and latter == set(range(12, 24))


def test_an_index_past_the_depth_is_a_one_line_config_error():
    with pytest.raises(
        ValueError, match=r"layers=custom: block 13 is outside the 12-block encoder 'tiny_clip'"
    ):
        resolve("custom", [3, 13], 12, None, "tiny_clip")
    with pytest.raises(ValueError, match=r"block \[20, 25\] is outside the 24-block reference depth"):
        resolve("mine", [[20, 25]], 27, 24)
    with pytest.raises(InstantiationException, match="block 30 is outside the 24-block encoder"):
        fusion_module("E_D", "custom", "layers.blocks=[5,30]")


# --- the model ----------------------------------------------------------------------------------


def fusion_module(
    strategy: str, layers: str = "3-18-23", *overrides: str, base: str = "experiment=mlvf_shapes"
):
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        argv = quote_numeric_options([base, f"fusion={strategy}", f"layers={layers}", *overrides])
        cfg = compose("train", overrides=argv)
    tokenizer = hydra.utils.instantiate(cfg.tokenizer, corpus=["a red circle left of a blue square"] * 20)
    torch.manual_seed(0)
    return build_module(cfg, tokenizer)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_each_strategy_keeps_the_image_token_count_and_the_projector_width(strategy):
    module = fusion_module(strategy)
    model, batch = module.model, vqa_batch(module)
    feats = model.encode_images(batch["pixel_values"])
    assert feats.shape == (2, 16, 128)
    widths = {"E_D": 4 * 48, "E_M": 48, "I_D": 48, "I_M": 48}  # 3 streams + the base for E_D
    assert model.connector.in_dim == widths[strategy]
    logits = module.model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])["logits"]
    assert logits.shape == (*batch["input_ids"].shape, len(module.tokenizer))
    if strategy.startswith("I_"):
        assert model.fusion.targets == [0, 3, 4] and len(model.fusion.projectors) == 3
        assert sorted(model.fusion.xattn) == (["0", "3", "4"] if strategy == "I_M" else [])


@pytest.mark.parametrize("strategy", ["E_M", "I_M"])
def test_zero_init_modular_fusion_is_exactly_plain_llava_until_the_gates_open(strategy):
    module = fusion_module(strategy)
    m = module.model.eval()
    plain = LlavaModel(m.vision_tower, m.connector, m.llm, m.image_token_id).eval()
    batch = vqa_batch(module)
    args = (batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
    with torch.no_grad():
        expected = plain(*args)["logits"]
        assert torch.equal(m(*args)["logits"], expected)
        open_gates(module.model.fusion)
        assert not torch.allclose(m(*args)["logits"], expected, atol=1e-3)


def cached_and_recomputed_logits(module, n: int = 3):
    """Scores of KV-cached greedy decoding, and the logits of a full forward pass over the
    prompt plus what was generated: equal only when decode steps run the training model."""
    model = module.model.eval()
    batch = vqa_batch(module, prompts=True)
    out = model.generate(
        batch["input_ids"], batch["attention_mask"], batch["pixel_values"], max_new_tokens=n,
        min_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None,
        return_dict_in_generate=True, output_logits=True,
    )  # fmt: skip
    prompt = batch["input_ids"].shape[1]
    ids = torch.cat([batch["input_ids"], out.sequences[:, -n:]], 1)
    mask = torch.cat([batch["attention_mask"], torch.ones_like(out.sequences[:, -n:])], 1)
    full = model(ids, mask, batch["pixel_values"])["logits"][:, prompt - 1 : -1]
    return torch.stack(out.logits, 1), full


@pytest.mark.parametrize("strategy", ["I_D", "I_M"])
def test_internal_injection_runs_at_prefill_and_decode_matches_a_full_forward(strategy, monkeypatch):
    module = fusion_module(strategy)
    open_gates(module.model.fusion)
    fusion = module.model.fusion
    calls: list[tuple[int, bool]] = []
    inject = fusion.inject

    def spy(layer, hidden):
        new = inject(layer, hidden)
        calls.append((hidden.shape[1], new is not hidden))
        return new

    monkeypatch.setattr(fusion, "inject", spy)
    with torch.no_grad():
        cached, full = cached_and_recomputed_logits(module)
    torch.testing.assert_close(cached, full, rtol=1e-4, atol=1e-4)
    prefill = [changed for length, changed in calls if length > 1]
    decode = [changed for length, changed in calls if length == 1]
    assert prefill and all(prefill)
    assert decode and all(decode) == (strategy == "I_M") and any(decode) == (strategy == "I_M")


# the experiment's Llama shape removed: each LLM at its own tiny preset
OWN_PRESET = [
    f"~llm.{k}"
    for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "initializer_range", "tie_word_embeddings")
]  # fmt: skip


@pytest.mark.parametrize("llm", ["tiny_qwen2", "tiny_qwen3", "tiny_gpt2", "tiny_gpt_neo"])
def test_internal_fusion_hooks_other_decoders_the_same_way(llm):
    module = fusion_module("I_M", "3-18-23", f"llm={llm}", *OWN_PRESET)
    open_gates(module.model.fusion)
    m = module.model
    batch = vqa_batch(module)
    args = (batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
    with torch.no_grad():
        plain = LlavaModel(m.vision_tower, m.connector, m.llm, m.image_token_id)(*args)[
            "logits"
        ]  # no context yet
        assert not torch.allclose(m(*args)["logits"], plain, atol=1e-3)
        cached, full = cached_and_recomputed_logits(module)
    torch.testing.assert_close(cached, full, rtol=1e-4, atol=1e-4)


def test_a_text_only_sample_keeps_its_states_under_internal_fusion():
    module = fusion_module("I_M")
    open_gates(module.model.fusion)
    text = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "red"}]}
    turns = [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red circle"}]
    image = {"image": Image.new("RGB", (32, 32), "red"), "conversations": turns}
    both, alone = encode_batch(module.processor, [text, image]), encode_batch(module.processor, [text])
    m = module.model.eval()
    with torch.no_grad():
        got = m(both["input_ids"], both["attention_mask"], both["pixel_values"])["logits"][0]
        ref = m(alone["input_ids"], alone["attention_mask"], None)["logits"][0]
    n = alone["input_ids"].shape[1]
    torch.testing.assert_close(got[:n], ref, rtol=1e-4, atol=1e-5)


def fusion_grads(module) -> dict[str, torch.Tensor]:
    module.train()
    module(vqa_batch(module))["loss"].backward()
    return {n: p.grad for n, p in module.model.fusion.named_parameters()}


@pytest.mark.parametrize("strategy", ["E_M", "I_D", "I_M"])
def test_every_fusion_parameter_gets_the_same_gradient_with_and_without_checkpointing(strategy):
    grads = {}
    for ckpt in (False, True):
        module = fusion_module(strategy, "3-18-23", f"family.gradient_checkpointing={ckpt}")
        open_gates(module.model.fusion)  # tanh(0) passes no gradient behind the gate
        grads[ckpt] = fusion_grads(module)
    assert grads[True].keys() == grads[False].keys() and grads[True]
    for name, g in grads[True].items():
        assert g is not None and g.abs().sum() > 0, name
        torch.testing.assert_close(g, grads[False][name], rtol=1e-4, atol=1e-7)


def test_closed_gates_train_first():
    grads = fusion_grads(fusion_module("I_M"))
    assert all(g.abs() > 0 for n, g in grads.items() if n.endswith("attn_gate"))
    assert all(g is None or g.abs().sum() == 0 for n, g in grads.items() if ".attn." in n)


@pytest.mark.parametrize(
    ("stage", "trained"),
    [("pretrain", {"connector", "fusion"}), ("finetune", {"connector", "fusion", "llm"})],
)
def test_stage_one_trains_projectors_and_fusion_and_stage_two_adds_the_llm(stage, trained):
    module = fusion_module("I_M", "3-18-23", f"stage={stage}", base="family=layer_fusion")  # the stock stages
    parts = module.model.parts()
    assert {n for n, p in parts.items() if any(q.requires_grad for q in p.parameters())} == trained
    rows = {r["component"]: r for r in module.parameter_rows()}
    assert rows["fusion"]["trainable"] == rows["fusion"]["total"] > 0
    module.apply_recipe({"connector": {"type": "full"}, "fusion": {"type": "frozen"}})
    assert not any(p.requires_grad for p in parts["fusion"].parameters())


@pytest.mark.parametrize("layers", SETS)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_and_layer_set_learns_a_fixed_batch(strategy, layers):
    module = fusion_module(strategy, layers)
    module.train()
    batch = vqa_batch(module, colours=("red", "blue", "green", "yellow"))
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(6):
        loss = module(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    if strategy in ("E_M", "I_M"):  # the gates moved off zero
        gates = module.model.fusion.gates()
        assert gates and all(abs(v) > 0 for v in gates.values())


# --- the real entry point -----------------------------------------------------------------------


@pytest.mark.parametrize(("strategy", "layers"), [("E_M", "former"), ("I_M", "3-18-23")])
def test_mlvf_shapes_trains_fusion_and_keeps_the_tower_bit_identical(strategy, layers, shapesworld, tmp_path):
    probe = [
        "+callbacks.parts._target_=train_probes.PartHashes",
        "+callbacks.parts.parts={tower:model.vision_tower,fusion:model.fusion,llm:model.llm}",
    ]
    overrides = [
        "experiment=mlvf_shapes", f"fusion={strategy}", f"layers={layers}", *data_overrides(shapesworld),
        *steps(4, 4), *probe, "logger=csv", "test=false", "family.monitor_every=2",
    ]  # fmt: skip
    run_train(overrides, tmp_path)
    hashes = json.loads((tmp_path / "parts_rank0.json").read_text())
    changed = {k for k in hashes["start"] if hashes["start"][k] != hashes["end"][k]}
    assert changed == {"fusion", "llm"}
    rows = metrics_rows(tmp_path)
    gates = {k for r in rows for k, v in r.items() if v and k.startswith("fusion/gate_")}
    assert gates and all(k.startswith("fusion/gate_") for k in gates)
    resolved = OmegaConf.load(tmp_path / "resolved_config.yaml")
    assert resolved.fusion.strategy == strategy and resolved.layers.name == layers
    # the checkpoint rebuilds the fused model: trained gates, and hooks live again for I_M
    loaded = VLMLitModule.from_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert all(abs(v) > 0 for v in loaded.model.fusion.gates().values())
    m, batch = loaded.model, vqa_batch(loaded)
    args = (batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
    with torch.no_grad():
        plain = LlavaModel(m.vision_tower, m.connector, m.llm, m.image_token_id)(*args)[
            "logits"
        ]  # before any context
        if strategy == "I_M":  # same parts, no fusion: must differ
            assert not torch.allclose(m(*args)["logits"], plain, atol=1e-4)


def test_the_sweep_file_defines_the_4x6_grid_over_mlvf_shapes():
    proc = cli(
        "vlm-train", ["--config-dir", "sweeps", "--config-name", "mlvf_grid", "--cfg", "all"], ROOT, 120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    cfg = OmegaConf.create(proc.stdout)
    params = {k: str(v).replace("'", "").split(",") for k, v in cfg.hydra.sweeper.params.items()}
    assert params == {"fusion": STRATEGIES, "layers": SETS}
    assert cfg.hydra.runtime.choices.experiment == "mlvf_shapes" and cfg.task_name == "sweep_mlvf"


def test_the_layer_set_named_18_is_an_option_not_a_number_on_the_command_line():
    assert quote_numeric_options(["layers=18", "layers=18,3-18", "seed=18", "+x=18"]) == [
        "layers='18'", "layers='18',3-18", "seed=18", "+x=18",
    ]  # fmt: skip
    proc = cli("vlm-train", ["experiment=mlvf_shapes", "layers=18", "--cfg", "job"], ROOT, 120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert OmegaConf.create(proc.stdout).layers.blocks == [18]


@pytest.mark.parametrize(
    ("experiment", "name", "blocks"),
    [
        ("mlvf_clip_mobilellama", "clip_14_558k", [3, 18, 23]),
        ("mlvf_siglip_mobilellama_finetune", "siglip_14_665k", [3, 20, 26]),
    ],
)
def test_real_experiments_carry_the_papers_run_names_and_fusion_tags(experiment, name, blocks, tmp_path):
    try:
        cfg = compose_run([f"experiment={experiment}"], tmp_path)
        identity = run_identity(cfg)
    finally:
        HydraConfig.instance().cfg = None
    assert identity.name == name
    assert {"fusion:E_D", "layers:3-18-23"} <= set(identity.tags)
    depth = 27 if "siglip" in experiment else 24
    assert layer_set("3-18-23", depth).blocks == blocks
    assert cfg.encoder.name == ("siglip_so400m" if "siglip" in experiment else "clip_vit_l14_336")


@pytest.mark.gpu
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_each_strategy_trains_under_bf16_autocast_on_the_gpu(strategy):
    module = fusion_module(strategy).cuda().train()
    open_gates(module.model.fusion)
    batch = on_cuda(vqa_batch(module))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = module(batch)["loss"]
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in module.model.fusion.parameters()]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    assert module.model.connector.proj[0].weight.grad.abs().sum() > 0

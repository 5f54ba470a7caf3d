"""The dense_connector family: which tower states each connector reads on 12- and 24-block
towers, the widths and token counts that follow, what each stage trains, stage 2 from a
stage-1 checkpoint with early stopping, the seed's matrix as config rows, and the errors a
wrong connector choice gets before anything is built."""

import json
from pathlib import Path

import hydra
import pytest
import torch
from hydra import compose, initialize_config_dir
from runs import cli, compose_run, data_overrides, metrics_rows, on_cuda, run_train, steps, vqa_batch

from vlm.cli.build import build_module
from vlm.cli.common import CONFIG_DIR, unknown_option
from vlm.cli.common import PROJECT_ROOT as ROOT
from vlm.core.zoo.registry import LLM_ENTRIES
from vlm.data.readers import DataFormatError
from vlm.families.dense_connector.connectors import middle_states, state_groups
from vlm.runtime.errors import ConfigError
from vlm.runtime.validate import validate

pytestmark = pytest.mark.usefixtures("single_thread")

CONNECTORS = ["linear", "mlp2x_gelu", "mlp4x_gelu", "dense_sti", "dense_sci", "dense_dci", "dense_dci4"]
WIDTH = 64  # the dense_shapes tower; a 4x4 grid of patches, LLM width 128


def dense_module(*overrides: str, depth: int = 12):
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            "train", overrides=["experiment=dense_shapes", f"encoder.num_hidden_layers={depth}", *overrides]
        )
    tokenizer = hydra.utils.instantiate(cfg.tokenizer, corpus=["what colour is the red circle"] * 20)
    torch.manual_seed(0)
    return build_module(cfg, tokenizer)


# --- which states, at which depth -----------------------------------------------------------------


def test_middle_states_and_groups_scale_with_the_depth():
    assert middle_states(24) == (7, 15)  # the paper's code on CLIP-L
    assert middle_states(12) == (4, 8)  # TinyCLIP-40M
    assert middle_states(27) == (8, 17)  # SigLIP so400m
    assert [list(g) for g in state_groups(24, 2)] == [list(range(0, 12)), list(range(12, 24))]
    assert [list(g) for g in state_groups(12, 2)] == [list(range(0, 6)), list(range(6, 12))]
    assert [(g[0], g[-1]) for g in state_groups(12, 4)] == [(0, 2), (3, 5), (6, 8), (9, 11)]
    assert [(g[0], g[-1]) for g in state_groups(24, 4)] == [(0, 5), (6, 11), (12, 17), (18, 23)]
    with pytest.raises(ValueError, match=r"connector.groups=13: a 12-block encoder"):
        state_groups(12, 13)


@pytest.mark.parametrize("depth", [12, 24])
@pytest.mark.parametrize("connector", CONNECTORS)
def test_each_connector_gives_its_tokens_and_width_on_12_and_24_blocks(connector, depth):
    module = dense_module(f"connector={connector}", depth=depth)
    model, batch = module.model, vqa_batch(module)
    tokens = 16 + 2 * (16 // 8) if connector == "dense_sti" else 16
    assert model.num_image_tokens == tokens
    assert model.encode_images(batch["pixel_values"]).shape == (2, tokens, 128)
    joined = {"dense_sci": 3, "dense_dci": 3, "dense_dci4": 5}.get(connector, 1)
    first = (model.connector.mlp if connector.startswith("dense") else model.connector).proj[0]
    assert first.in_features == joined * WIDTH
    linears = sum(isinstance(m, torch.nn.Linear) for m in model.connector.modules())
    assert linears == {"linear": 1, "mlp4x_gelu": 4}.get(connector, 2)
    # the loss reaches the LLM through the image tokens
    out = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["labels"])
    assert torch.isfinite(out["loss"])


@pytest.mark.parametrize("depth", [12, 24])
@pytest.mark.parametrize("connector", ["dense_sti", "dense_sci", "dense_dci", "dense_dci4"])
def test_the_connector_reads_exactly_the_states_the_paper_names(connector, depth):
    """Recomputed by hand from the tower's hidden states (patches only, CLS dropped)."""
    model = dense_module(f"connector={connector}", depth=depth).model
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        h = [s[:, 1:] for s in model.vision_tower.states(pixels, depth)]
        final = h[depth - 1]  # select_layer=-2
        mid = [h[i] for i in middle_states(depth)]
        if connector == "dense_sti":
            pooled = [torch.nn.functional.avg_pool1d(m.transpose(1, 2), 8, 8).transpose(1, 2) for m in mid]
            joined = torch.cat([final, *pooled], dim=1)
        elif connector == "dense_sci":
            joined = torch.cat([final, *mid], dim=-1)
        else:
            groups = state_groups(depth, 4 if connector == "dense_dci4" else 2)
            joined = torch.cat([*(torch.stack([h[i] for i in g]).mean(0) for g in groups), final], dim=-1)
        assert torch.allclose(model.encode_images(pixels), model.connector.mlp(joined), atol=1e-5)


# --- what each stage trains -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stage", "trained"), [("pretrain", {"connector"}), ("finetune", {"connector", "llm"})]
)
@pytest.mark.parametrize("connector", CONNECTORS)
def test_gradients_reach_the_connector_and_the_llm_only_in_stage_two(connector, stage, trained):
    module = dense_module(f"connector={connector}", f"stage={stage}")
    module.train()
    batch = vqa_batch(module)
    module(batch)["loss"].backward()
    for name, part in module.model.parts().items():
        grads = [p.grad for p in part.parameters()]
        if name in trained:
            assert all(g is not None and g.abs().sum() > 0 for g in grads), name
        else:
            assert all(g is None for g in grads) and not any(p.requires_grad for p in part.parameters())


@pytest.mark.gpu
@pytest.mark.parametrize("connector", ["mlp4x_gelu", "dense_sti", "dense_dci4"])
def test_each_connector_trains_under_bf16_autocast_on_the_gpu(connector):
    module = dense_module(f"connector={connector}", "stage=finetune").cuda().train()
    batch = on_cuda(vqa_batch(module))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = module(batch)["loss"]
    loss.backward()
    assert torch.isfinite(loss)
    for name in ("connector", "llm"):
        grads = [p.grad for p in module.model.parts()[name].parameters()]
        assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads), name


def test_stage_two_starts_from_stage_one_and_stops_early(shapesworld, tmp_path):
    """Stage 1 changes the connector only (tower and LLM bit-identical); stage 2 loads that
    connector, trains it and the LLM, and with a learning rate of 0 (val/loss never improves)
    early stopping ends it after patience + 1 validations, not at max_epochs."""
    probe = [
        "+callbacks.parts._target_=train_probes.PartHashes",
        "+callbacks.parts.parts={tower:model.vision_tower,connector:model.connector,llm:model.llm}",
    ]
    base = ["connector=dense_dci", *data_overrides(shapesworld), *probe, "logger=csv", "test=false"]
    run_train(["experiment=dense_shapes", *base, *steps(3, 3)], tmp_path / "s1")
    one = json.loads((tmp_path / "s1" / "parts_rank0.json").read_text())
    assert {k for k in one["start"] if one["start"][k] != one["end"][k]} == {"connector"}

    ckpt = tmp_path / "s1" / "checkpoints" / "last.ckpt"
    stage2 = ["experiment=dense_shapes_stage2", *base, f"stage.init_from={ckpt}"]
    run_train([*stage2, *steps(4, 2)], tmp_path / "s2")
    two = json.loads((tmp_path / "s2" / "parts_rank0.json").read_text())
    assert two["start"]["connector"] == one["end"]["connector"]  # loaded from stage 1
    assert two["start"]["tower"] == one["end"]["tower"]
    assert {k for k in two["start"] if two["start"][k] != two["end"][k]} == {"connector", "llm"}

    stalled = [*stage2, "stage.lr=0", "trainer.max_epochs=6", "callbacks.early_stopping.patience=1"]
    run_train([*stalled, "data.batch_size=32"], tmp_path / "s3")
    validations = [r for r in metrics_rows(tmp_path / "s3") if r.get("val/loss")]
    assert len(validations) == 2  # the first sets the best, the second fails to improve: stop


# --- the seed's matrix ------------------------------------------------------------------------------

SEED_MATRIX = {  # row: (data, dense connector, chat template, scheduler, epochs, batch) as in its table
    1: ("20kUmap", False, False, "linear", 3, 1),
    2: ("20kUmap", False, False, "linear", 3, 12),
    3: ("20kUmap", False, False, "linear", 6, 12),
    4: ("20kUmap", False, False, "cosine", 3, 12),
    5: ("20kUmap", False, False, "cosine", 6, 12),
    6: ("20kUmap", False, True, "cosine", 6, 8),
    7: ("20kUmap", False, True, "cosine", 9, 8),
    8: ("10kRandom", False, False, "linear", 3, 8),
    9: ("10kRandom", False, False, "linear", 6, 8),
    10: ("10kRandom", False, False, "cosine", 3, 12),
    11: ("10kRandom", False, False, "cosine", 6, 12),
    12: ("10kRandom", False, True, "linear", 6, 8),
    13: ("10kRandom", False, True, "cosine", 6, 8),
    14: ("10kRandom", True, True, "linear", 3, 8),
    15: ("10kRandom", True, True, "linear", 6, 8),
    16: ("10kRandom", True, True, "linear", 9, 8),
    17: ("10kRandom", True, True, "cosine", 3, 8),
    18: ("10kRandom", True, True, "cosine", 6, 8),
    19: ("10kRandom", True, True, "cosine", 9, 8),
}


def compose_sweep(name: str, *overrides: str):
    """A sweep file as ``--config-dir sweeps --config-name <name>`` composes it (one job)."""
    with initialize_config_dir(str(ROOT / "sweeps"), version_base="1.3"):
        return compose(name, overrides=[*overrides, f"hydra.searchpath=[file://{CONFIG_DIR}]"])


def test_each_matrix_row_composes_the_seeds_run():
    for row, (data, dense, chat, scheduler, epochs, batch) in SEED_MATRIX.items():
        cfg = compose_sweep("dense_connector_matrix", f"dense_matrix=row{row:02d}")
        assert cfg.data.train_json == f"curated/{data}.json", row
        assert cfg.family.model.connector.get("depth") == (4 if dense else 1), row  # mlp4x_gelu | linear
        assert cfg.stage.template == ("chat" if chat else "raw"), row
        assert cfg.scheduler._target_.endswith(f"{scheduler}_warmup"), row
        assert (cfg.trainer.max_epochs, cfg.data.batch_size) == (epochs, batch), row
        assert (cfg.stage.tune.connector.type, cfg.stage.tune.llm.type) == ("full", "frozen")
        assert cfg.logger.wandb.project == "multimodal-llama"


def test_stage_two_rows_keep_the_rows_choices_at_three_epochs_of_batch_three():
    for row in (3, 7, 9, 13, 16, 19):
        data, _, chat, scheduler, _, _ = SEED_MATRIX[row]
        cfg = compose_sweep("dense_connector_stage2", f"dense_matrix=row{row:02d}")
        assert cfg.data.train_json == f"curated/{data}.json"
        assert cfg.stage.template == ("chat" if chat else "raw") and cfg.stage.tune.llm.type == "full"
        assert cfg.scheduler._target_.endswith(f"{scheduler}_warmup")
        assert (cfg.trainer.max_epochs, cfg.data.batch_size) == (3, 3)
        assert cfg.callbacks.early_stopping.monitor == "val/loss"


@pytest.mark.slow  # a 2-job multirun and the report: make test-full
def test_the_matrix_sweep_feeds_stage_two_and_the_report_prints_the_rows(shapesworld, tmp_path):
    """Row 3 with two connectors in stage 1 and its stage-2 job, laid out as `make sweep-dense`
    does: the stage-2 job finds its row's checkpoint by folder name; vlm-report prints the rows."""
    shapes = [o for o in data_overrides(shapesworld) if not o.startswith("data.batch_size")]  # the rows'
    tiny = [*shapes, "logger=csv", "trainer.max_epochs=1", "data.max_val_samples=8"]
    cfg = compose_run(["experiment=dense_shapes", *tiny], tmp_path)
    hydra.utils.instantiate(cfg.data).prepare_data()
    records = json.loads((Path(cfg.data.root) / "llava_train.json").read_text())
    (Path(cfg.data.root) / "curated").mkdir(exist_ok=True)
    for name, n in (("20kUmap", 24), ("10kRandom", 12)):
        (Path(cfg.data.root) / "curated" / f"{name}.json").write_text(json.dumps(records[:n]))

    def sweep(name: str, stage: str, connectors: str):
        args = ["-m", "--config-dir", "sweeps", "--config-name", name, *tiny, "dense_matrix=row03"]
        return cli(
            "vlm-train",
            [*args, f"connector={connectors}", f"hydra.sweep.dir={tmp_path}/m/{stage}"],
            ROOT,
            300,
        )

    one = sweep("dense_connector_matrix", "stage1", "linear,dense_dci4")
    assert one.returncode == 0, one.stderr[-3000:]
    two = sweep("dense_connector_stage2", "stage2", "dense_dci4")
    assert two.returncode == 0, two.stderr[-3000:]
    assert "stage1/row03-dense_dci4/checkpoints/last.ckpt: loaded" in two.stdout + two.stderr
    keys = ["--keys", "dense_matrix", "connector", "trainer.max_epochs", "data.batch_size"]
    report = cli("vlm-report", [f"{tmp_path}/m", "--metric", "test/acc", "--extra", "val/loss:min", *keys],
                 ROOT, 60)  # fmt: skip
    assert report.returncode == 0, report.stderr
    rows = [line for line in report.stdout.splitlines() if "| row03 |" in line]
    assert len(rows) == 3 and all(line.rstrip(" |").endswith("ok") for line in rows)
    # stage 1 at the row's batch (12), stage 2 at the seed's 3
    expected = ("linear | 1 | 12", "dense_dci4 | 1 | 12", "dense_dci4 | 1 | 3")
    for cells in (f"| row03 | {e} |" for e in expected):
        assert sum(cells in line for line in rows) == 1, cells


# --- wrong choices, before anything is built ----------------------------------------------------------


def test_an_unknown_connector_is_one_line_at_the_command_line(tmp_path):
    proc = cli("vlm-train", ["experiment=dense_shapes", "connector=dense_xyz"], tmp_path, 60)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [
        "vlm-train: connector=dense_xyz: no such option in conf/connector; choose from dense_dci, "
        "dense_dci4, dense_sci, dense_sti, linear, mlp2x_gelu, mlp4x_gelu"
    ]


def test_the_option_check_reads_lists_and_sweeps_and_leaves_hydras_groups_alone():
    ok = ["connector=dense_sti", "connector=linear,dense_dci4", "+logger=[csv,wandb]", "layers='18'",
          "dense_matrix=glob(row*)", "hydra/launcher=joblib", "connector=null", "seed=3"]  # fmt: skip
    assert unknown_option(["vlm-train", *ok]) is None
    assert unknown_option(["vlm-train", "+logger=[csv,wand]"]).startswith("logger=wand: no such option")
    assert unknown_option(["vlm-train", "connector=linear,dense_x"]).startswith("connector=dense_x:")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["connector=dense_dci", "connector.groups=13"], "connector.groups=13: a 12-block encoder has 12"),
        (["family=llava", "connector=dense_sci"], "connector=dense_sci reads several encoder layers"),
    ],
)
def test_an_impossible_connector_is_a_config_error_before_anything_is_built(overrides, message, tmp_path):
    cfg = compose_run(["experiment=dense_shapes", *overrides, f"paths.data_dir={tmp_path}"], tmp_path)
    with pytest.raises(ConfigError, match=message):
        validate(cfg)
    assert not (tmp_path / "shapesworld").exists()  # nothing generated


def test_a_row_whose_curated_subset_is_missing_names_the_file(tmp_path):
    """The rows read vlm-curate's files, which ShapesWorld's generator does not write."""
    overrides = ["experiment=dense_shapes", "+dense_matrix=row03", *data_overrides(tmp_path)]
    data = hydra.utils.instantiate(compose_run(overrides, tmp_path).data)
    with pytest.raises(DataFormatError, match=r"^data.train_json: .*/curated/20kUmap.json does not exist$"):
        data.prepare_data()


# --- the parts at real size ---------------------------------------------------------------------------


def test_llama32_base_takes_the_instruct_tokenizer_for_its_chat_template():
    base, instruct = LLM_ENTRIES["llama3.2_1b"], LLM_ENTRIES["llama3.2_1b_instruct"]
    assert base.hub_id == "meta-llama/Llama-3.2-1B" and instruct.hub_id == "meta-llama/Llama-3.2-1B-Instruct"
    assert base.tokenizer_id == instruct.tokenizer_id == instruct.hub_id and base.has_chat_template
    assert base.arch == instruct.arch

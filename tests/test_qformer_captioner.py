"""Q-Former captioner: the Q-Former's tokens, gated cross-attention that leaves the decoder
exactly unchanged at init, prefix mode, the unfreezing phases (what trains when, tied
embeddings, constant requires_grad for DDP), caption labels, decoding with the KV cache, the
real ``train`` entry point (metrics, analysis PNGs), export round-trip and the sweep file."""

import json

import hydra
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import InstantiationException
from omegaconf import OmegaConf, open_dict
from PIL import Image
from runs import cli, data_overrides, encode_batch, metrics_rows, on_cuda, open_gates, run_train

from vlm.cli.build import build_module
from vlm.cli.common import CONFIG_DIR
from vlm.cli.common import PROJECT_ROOT as ROOT
from vlm.core.lit_module import VLMLitModule
from vlm.core.recipes import PartTune
from vlm.core.tokenizer import IGNORE_INDEX
from vlm.core.zoo.llms import decoder_layers
from vlm.families.qformer_captioner.export import load_pretrained
from vlm.families.qformer_captioner.qformer import QFormer

CAPTIONS = ["a red circle left of a blue square", "two shapes on a plain background", "a green triangle"]


pytestmark = pytest.mark.usefixtures("single_thread")


def captioner(*overrides: str, base: str = "experiment=qformer_shapes", tune_decoder: str | None = None):
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[base, *overrides])
    if tune_decoder:  # a key the stage file lacks (the command line cannot add a typed entry)
        with open_dict(cfg):
            cfg.stage.tune.decoder = PartTune(type=tune_decoder)
    tokenizer = hydra.utils.instantiate(cfg.tokenizer, corpus=CAPTIONS * 20)
    torch.manual_seed(0)
    return build_module(cfg, tokenizer)


def caption_batch(module, prompts: bool = False, colours=("red", "blue"), captions=CAPTIONS[:2]):
    samples = [
        {
            "image": Image.new("RGB", (32, 32), colour),
            "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": text}],
        }
        for colour, text in zip(colours, captions, strict=True)
    ]
    return encode_batch(module.processor, samples, prompts)


# --- the Q-Former -------------------------------------------------------------------------------


def test_qformer_gives_the_global_token_then_the_queries_and_reads_the_image():
    torch.manual_seed(0)
    q = QFormer(
        vision_width=48, width=32, depth=3, num_heads=4, num_queries=5, cross_attention_every=2
    ).eval()
    assert [layer.cross_attn is not None for layer in q.layers] == [True, False, True]
    image, cls = torch.randn(2, 10, 48), torch.randn(2, 48)
    out = q(image, cls)
    assert out.shape == (2, 6, 32) and q.num_tokens == 6
    other_image = q(torch.randn(2, 10, 48), cls)
    assert not torch.allclose(out[:, 1:], other_image[:, 1:])  # the queries read the patches
    # the global token starts from the CLS state: change only CLS and row 0 moves first
    q.layers = q.layers[:0]  # no mixing: what each row holds before any layer
    base, moved = q(image, cls), q(image, torch.randn_like(cls))
    assert not torch.allclose(base[:, 0], moved[:, 0]) and torch.equal(base[:, 1:], moved[:, 1:])


def test_qformer_config_errors_are_one_line():
    with pytest.raises(ValueError, match="qformer: num_heads=5 must divide the width 32"):
        QFormer(48, width=32, num_heads=5)
    with pytest.raises(ValueError, match="global_token='mean': choose from cls, learned"):
        QFormer(48, width=32, num_heads=4, global_token="mean")
    with pytest.raises(InstantiationException, match=r"cross_attention_every=6 must be in 1\.\.4"):
        captioner("conditioning.every=6")


# --- conditioning -------------------------------------------------------------------------------


def test_cross_attention_leaves_the_decoder_exactly_unchanged_until_the_gates_open():
    module = captioner()
    model, batch = module.model, caption_batch(module)
    assert model.num_image_tokens == 0 and model.mode == "cross_attention"
    assert len(model.conditioning.xattn) == len(decoder_layers(model.llm)) == 4  # every block
    args = (batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
    with torch.no_grad():
        fused = model(*args)["logits"]
        plain = model(args[0], args[1], None)["logits"]  # no image: the bare decoder, same path
        assert torch.equal(fused, plain)
        hf = model.llm(input_ids=args[0], attention_mask=args[1]).logits
        real = args[1].bool()  # padding takes position 0 here, HF's next index: only real tokens compare
        assert torch.allclose(plain[real], hf[real], atol=1e-5)
        open_gates(module.model.conditioning)
        red, blue = model(*args)["logits"]
        swapped = model(args[0], args[1], args[2].flip(0))["logits"]
    assert not torch.allclose(red, plain[0], atol=1e-4)
    assert not torch.allclose(swapped[0], red, atol=1e-4)  # the image now matters


def test_closed_gates_pass_gradient_to_the_gates_only_then_to_the_qformer():
    module = captioner()
    model, batch = module.model, caption_batch(module)
    model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["labels"])[
        "loss"
    ].backward()
    gates = [m.attn_gate for m in model.conditioning.xattn.values()]
    assert all(g.grad is not None and g.grad.abs() > 0 for g in gates)
    assert all(p.grad is None or not p.grad.any() for p in model.connector.parameters())
    module.zero_grad()
    open_gates(module.model.conditioning)
    model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["labels"])[
        "loss"
    ].backward()
    assert model.connector.queries.grad.abs().sum() > 0


def test_every_kth_block_and_prefix_mode():
    every2 = captioner("conditioning.every=2").model
    assert sorted(every2.conditioning.xattn) == ["0", "2"]
    module = captioner("conditioning=prefix", "family.model.qformer.num_queries=6")
    model, batch = module.model, caption_batch(module)
    assert model.mode == "prefix" and model.num_image_tokens == 7  # the global token + 6 queries
    span = batch["input_ids"] == model.image_token_id
    assert span.sum(1).tolist() == [7, 7] and (batch["labels"][span] == IGNORE_INDEX).all()
    logits = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])["logits"]
    swapped = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"].flip(0))["logits"]
    assert not torch.allclose(logits[0], swapped[0], atol=1e-4)


def trained_grads(module) -> dict[str, torch.Tensor]:
    module.train()
    module(caption_batch(module))["loss"].backward()
    return {n: p.grad for n, p in module.named_parameters() if p.requires_grad and p.grad is not None}


@pytest.mark.parametrize("mode", ["cross_attention", "prefix"])
def test_every_trained_parameter_gets_the_same_gradient_with_and_without_checkpointing(mode):
    grads = {}
    for ckpt in (False, True):
        module = captioner(f"conditioning={mode}", f"family.gradient_checkpointing={ckpt}", "unfreeze=all")
        open_gates(module.model.conditioning)  # tanh(0) passes no gradient behind the gate
        grads[ckpt] = trained_grads(module)
    assert grads[True].keys() == grads[False].keys()
    assert any(k.startswith("model.connector.") for k in grads[True])  # the Q-Former learns
    assert any(".transformer.h.0." in k for k in grads[True])  # so does the first decoder block
    for name, g in grads[True].items():
        torch.testing.assert_close(g, grads[False][name], rtol=1e-4, atol=1e-7, msg=name)


# --- labels and decoding ------------------------------------------------------------------------


def test_labels_are_the_caption_and_eos_only_and_captions_are_cut_to_caption_length():
    module = captioner("family.caption_length=4")  # EOS included
    tok = module.tokenizer
    batch = caption_batch(module, captions=["a red circle", CAPTIONS[0]])
    ids, labels = batch["input_ids"], batch["labels"]
    short = tok(" a red circle".strip(), add_special_tokens=False)["input_ids"]
    assert ids[0, 0] == tok.bos_token_id and labels[0, 0] == IGNORE_INDEX
    kept = labels[0][labels[0] != IGNORE_INDEX].tolist()
    assert kept == short + [tok.eos_token_id]  # 3 words + EOS fit in 4
    assert (labels[0][batch["attention_mask"][0] == 0] == IGNORE_INDEX).all()  # padding
    long = labels[1][labels[1] != IGNORE_INDEX].tolist()
    assert len(long) == 4 and tok.eos_token_id not in long  # cut at 4 caption tokens


@pytest.mark.parametrize("mode", ["cross_attention", "prefix"])
def test_kv_cached_greedy_decoding_matches_full_forward_passes(mode):
    module = captioner(f"conditioning={mode}")
    open_gates(module.model.conditioning)
    model = module.model.eval()
    batch = caption_batch(module, prompts=True)
    args = (batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
    eos, pad = module.tokenizer.eos_token_id, module.tokenizer.pad_token_id
    kw = {"pad_token_id": pad, "eos_token_id": eos}
    new = model.generate(*args, max_new_tokens=5, do_sample=False, suppress_tokens=[eos], **kw)
    ids, mask = args[0], args[1]
    with torch.no_grad():
        for step in range(5):
            logits = model(ids, mask, args[2])["logits"][:, -1]
            logits[:, eos] = -torch.inf
            assert torch.equal(logits.argmax(-1), new[:, step]), step
            ids = torch.cat([ids, new[:, step : step + 1]], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    beams = model.generate(*args, max_new_tokens=4, num_beams=3, **kw)
    sampled = model.generate(*args, max_new_tokens=4, do_sample=True, top_p=0.9, temperature=0.7, **kw)
    assert beams.shape[0] == sampled.shape[0] == 2


# --- unfreezing ---------------------------------------------------------------------------------


def test_phases_freeze_70_then_50_percent_and_requires_grad_never_changes():
    module = captioner("unfreeze.epochs=[1,1]")
    plan, llm = module.unfreezing, module.model.llm
    assert plan.frozen_blocks == [3, 2]  # of 4 blocks
    blocks = decoder_layers(llm)
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert ids(blocks[3].parameters()) <= ids(plan.trained(0))
    assert not ids(blocks[2].parameters()) & ids(plan.trained(0))
    assert ids(blocks[2].parameters()) <= ids(plan.trained(1))
    assert not ids(blocks[1].parameters()) & ids(plan.trained(1))
    wanted = {n for n, p in module.named_parameters() if p.requires_grad}
    module.phase = 1
    assert {n for n, p in module.named_parameters() if p.requires_grad} == wanted  # DDP-safe
    rows = {r["component"]: r for r in module.parameter_rows()}
    module.phase = 0
    assert {r["component"]: r for r in module.parameter_rows()}["decoder"]["trainable"] < rows["decoder"][
        "trainable"
    ]
    assert plan.phase_at(0) == 0 and plan.phase_at(1) == 1 and plan.phase_at(7) == 1


def test_training_the_head_unties_it_from_frozen_embeddings_and_keeps_them_tied_otherwise():
    llm = captioner().model.llm
    assert llm.lm_head.weight is not llm.transformer.wte.weight and not llm.config.tie_word_embeddings
    assert not llm.transformer.wte.weight.requires_grad and llm.lm_head.weight.requires_grad
    llm = captioner("unfreeze.embeddings=true").model.llm
    assert llm.lm_head.weight is llm.transformer.wte.weight and llm.transformer.wte.weight.requires_grad
    with pytest.raises(InstantiationException, match="tune.decoder and unfreeze both set"):
        captioner(tune_decoder="full")
    decoder_only = captioner("family.unfreeze=null", tune_decoder="full")
    assert decoder_only.unfreezing is None and all(
        p.requires_grad for p in decoder_only.model.llm.parameters()
    )


# --- the real entry point -----------------------------------------------------------------------


def captions_run(tmp_path, data_dir, *extra):
    probe = [
        "+callbacks.parts._target_=train_probes.PartHashes",
        "+callbacks.parts.parts={tower:model.vision_tower,qformer:model.connector,xattn:model.conditioning,"
        "wte:model.llm.transformer.wte,block0:model.llm.transformer.h.0,block1:model.llm.transformer.h.1,"
        "block2:model.llm.transformer.h.2,block3:model.llm.transformer.h.3,head:model.llm.lm_head}",
    ]
    overrides = [
        "experiment=qformer_shapes", *data_overrides(data_dir), "data.shapesworld.num_test=8",
        "trainer.limit_train_batches=3", "trainer.log_every_n_steps=1", "family.monitor_every=1",
        "family.num_analysis_images=4", "logger=csv", *probe, *extra,
    ]  # fmt: skip
    return run_train(overrides, tmp_path)


@pytest.mark.slow  # 75 s; make test runs the family through fast_dev_run and the DDP phase test
def test_train_runs_the_phases_scores_captions_and_draws_the_analysis(shapesworld, tmp_path):
    metrics = captions_run(tmp_path, shapesworld)
    record = json.loads((tmp_path / "parts_rank0.json").read_text())
    start, (phase1, phase2) = record["start"], record["epochs"]
    changed = lambda a, b: {k for k in a if a[k] != b[k]}  # noqa: E731
    assert changed(start, phase1) == {"qformer", "xattn", "block3", "head"}
    assert changed(phase1, phase2) == {"qformer", "xattn", "block2", "block3", "head"}
    assert start["tower"] == phase2["tower"] and start["wte"] == phase2["wte"]
    assert start["block0"] == phase2["block0"] and start["block1"] == phase2["block1"]
    for key in ("bleu1", "bleu4", "meteor", "rouge_l", "cider"):
        assert 0.0 <= metrics[f"test/{key}"] <= 10.0, key
    rows = metrics_rows(tmp_path)
    phases = sorted({round(float(r["unfreeze/phase"])) for r in rows if r.get("unfreeze/phase")})
    assert phases == [0, 1]
    # each phase's lr (2e-3, then 1e-3) is the base the cosine schedule scales, not stage.lr (1e-4)
    lr = {int(r["step"]): float(r["lr-AdamW/pg1"]) for r in rows if r.get("lr-AdamW/pg1")}
    assert max(v for s, v in lr.items() if s < 3) > 1e-3 >= max(v for s, v in lr.items() if s >= 3) > 1e-4
    assert any(k.startswith("conditioning/gate_0_attn") and v for r in rows for k, v in r.items())
    pngs = {p.stem for p in (tmp_path / "analysis").glob("*.png")}
    assert pngs == {
        "query_patch_attention",
        "word_query_attention",
        "token_similarity",
        "caption_grid",
        "parameters",
    }
    assert 0.0 <= metrics["test/discriminative_power"] <= 2.0
    # export: the folder rebuilds the same captioner, which writes the same captions
    module = VLMLitModule.from_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    proc = cli(
        "vlm-export",
        [f"ckpt={tmp_path / 'checkpoints' / 'last.ckpt'}", f"out={tmp_path / 'export'}"],
        tmp_path,
        300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    files = {p.name for p in (tmp_path / "export").iterdir()}
    assert {"config.json", "tokenizer", "qformer.safetensors", "decoder.safetensors"} <= files
    loaded = load_pretrained(tmp_path / "export")
    batch = caption_batch(module, prompts=True, colours=("red", "blue", "green"), captions=CAPTIONS)
    assert module.generate(batch) == loaded.generate(batch)
    assert module.generate(batch, num_beams=2) == loaded.generate(batch, num_beams=2)
    # the checkpoint as a user queries it: a caption for an image, the test scores again
    ckpt = next((tmp_path / "checkpoints").glob("best-*.ckpt"))
    image = tmp_path / "red.png"
    Image.new("RGB", (32, 32), "red").save(image)
    proc = cli("vlm-predict", [f"ckpt={ckpt}", f"image={image}"], tmp_path, 120)
    assert proc.returncode == 0 and proc.stdout.startswith("caption: "), proc.stderr[-2000:]
    proc = cli("vlm-eval", [f"ckpt={ckpt}"], tmp_path, 300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    printed = dict(line.split(": ") for line in proc.stdout.splitlines() if line.startswith("test/"))
    assert float(printed["test/cider"]) == pytest.approx(metrics["test/cider"], abs=1e-4)


@pytest.mark.parametrize("mode", ["cross_attention", "prefix"])
def test_analysis_draws_every_figure_and_logs_them_to_wandb(mode, tmp_path):
    from lightning.pytorch.loggers import WandbLogger

    from vlm.families.qformer_captioner.analysis import FIGURES, word_attention, write_analysis

    module = captioner(f"conditioning={mode}")
    open_gates(module.model.conditioning)
    module.eval()
    batch = caption_batch(module, prompts=True, colours=("red", "blue", "green"), captions=CAPTIONS)
    batch["references"] = [[c] for c in CAPTIONS]
    tok = module.tokenizer
    new = module.model.generate(
        batch["input_ids"], batch["attention_mask"], batch["pixel_values"], max_new_tokens=4,
        min_new_tokens=4, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    maps = word_attention(module, batch, new)
    queries = 1 + module.model.connector.num_queries
    assert [tuple(m.shape) for m in maps] == [(4, queries)] * 3
    # over the Q-Former tokens only: cross-attention rows sum to 1, prefix rows to the share of the span
    sums = torch.stack([m.sum(-1) for m in maps])
    if mode == "cross_attention":
        torch.testing.assert_close(sums, torch.ones_like(sums))
    else:
        assert ((sums > 0) & (sums < 1)).all()
    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="test")
    stats = write_analysis(module, batch, tmp_path, [logger])
    logger.experiment.finish()
    assert {p.stem for p in (tmp_path / "analysis").glob("*.png")} == set(FIGURES)
    assert set(stats) == {"discriminative_power", "global_query_similarity", "image_specificity"}
    media = list(tmp_path.glob("wandb/offline-run-*/files/media/images/analysis/*.png"))
    assert {p.name.split("_")[0] for p in media} >= {"caption", "parameters", "token"}


PHASE_PARTS = (
    "+callbacks.parts.parts={qformer:model.connector,block1:model.llm.transformer.h.1,"
    "block2:model.llm.transformer.h.2,block3:model.llm.transformer.h.3}"
)


@pytest.mark.slow  # two DDP processes: make test-full (test_ddp keeps DDP in make test)
def test_ddp_ranks_stay_identical_when_phase_two_unfreezes_more_blocks(shapesworld, tmp_path):
    """A block first trained in phase 2 must be synced like the others: had its requires_grad
    been flipped after DDP wrapped the model, each rank would step it with its own gradient."""
    args = [
        "experiment=qformer_shapes", "trainer=ddp_cpu", *data_overrides(shapesworld),
        f"paths.log_dir={tmp_path / 'logs'}", "logger=csv", "test=false", "monitor=null",
        "trainer.limit_train_batches=2", "trainer.limit_val_batches=0", "trainer.num_sanity_val_steps=0",
        "+callbacks.parts._target_=train_probes.PartHashes", PHASE_PARTS,
    ]  # fmt: skip
    proc = cli("vlm-train", args, tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = (tmp_path / "logs" / "train" / "runs").iterdir()
    ranks = [json.loads((run / f"parts_rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["epochs"] == ranks[1]["epochs"]  # every part, after each phase
    start, (phase1, phase2) = ranks[0]["start"], ranks[0]["epochs"]
    assert start["block2"] == phase1["block2"] != phase2["block2"]
    assert start["block1"] == phase2["block1"] and start["block3"] != phase1["block3"]


def test_the_sweep_file_defines_unfreezing_x_queries_x_conditioning():
    proc = cli(
        "vlm-train", ["--config-dir", "sweeps", "--config-name", "qformer_grid", "--cfg", "all"], ROOT, 120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    cfg = OmegaConf.create(proc.stdout)
    params = {k: str(v).split(",") for k, v in cfg.hydra.sweeper.params.items()}
    assert params == {
        "unfreeze": ["frozen", "70-50", "all"],
        "family.model.qformer.num_queries": ["8", "32"],
        "conditioning": ["cross_attention", "prefix"],
    }
    assert cfg.hydra.runtime.choices.experiment == "qformer_shapes"


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["cross_attention", "prefix"])
def test_trains_and_captions_under_bf16_autocast_on_the_gpu(mode):
    module = captioner(f"conditioning={mode}").cuda().train()
    open_gates(module.model.conditioning)
    batch = on_cuda(caption_batch(module))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = module(batch)["loss"]
    loss.backward()
    assert torch.isfinite(loss)
    assert module.model.connector.queries.grad.abs().sum() > 0
    module.eval()
    prompts = on_cuda(caption_batch(module, prompts=True))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert len(module.generate(prompts, num_beams=2)) == 2

"""The sam_segmentation family: gIoU / cIoU on hand-made masks, LISA's losses with ignored
pixels, where the prompts are read ([SEG] positions under left and right padding, the fused
pool), what trains and what stays bit-identical, SAM's own encoder, both modes on all four VLM
classes, and the one-line errors of impossible choices."""

import json

import hydra
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from vlm.cli.build import build_module
from vlm.cli.common import CONFIG_DIR
from vlm.core.seg_metrics import SegmentationIoU
from vlm.families.sam_segmentation.losses import mask_losses
from vlm.families.sam_segmentation.model import SEG_TOKEN

pytestmark = pytest.mark.usefixtures("single_thread")

CORPUS = ["Please segment the red circle.", "It is [SEG].", "the shape left of the blue square"] * 10
VLMS = ["tiny_llava", "tiny_idefics3", "tiny_qwen2_vl", "tiny_paligemma"]


def segmenter(*overrides: str):
    """experiment=sam_shapes, with LISA's [SEG] prompts unless ``prompt=`` says otherwise."""
    prompt = [] if any(o.startswith("prompt=") for o in overrides) else ["prompt=seg_token"]
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["experiment=sam_shapes", *prompt, *overrides])
    tokenizer = hydra.utils.instantiate(cfg.tokenizer, corpus=CORPUS)
    torch.manual_seed(0)
    return build_module(cfg, tokenizer)


def square(x0: int, y0: int, x1: int, y1: int) -> list:
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def sample(question: str, n_seg: int = 1, colour: str = "white", ignore: list | None = None) -> dict:
    answer = " and ".join([f"It is {SEG_TOKEN}."] * n_seg)
    return {
        "id": question[:8],
        "image": Image.new("RGB", (64, 48), colour),
        "conversations": [
            {"from": "human", "value": f"<image>\nPlease segment {question}"},
            {"from": "gpt", "value": answer},
        ],
        "meta": {
            "qtype": "attribute",
            "masks": [square(4 + 8 * k, 4, 20 + 8 * k, 30) for k in range(n_seg)],
            "ignore": ignore or [],
            "height": 48,
            "width": 64,
        },
    }


def batch(module, samples: list[dict], prompts: bool = False) -> dict:
    proc = module.processor
    if prompts:
        return proc.collate_prompts([proc.encode_prompt(s) for s in samples])
    return proc.collate([proc.encode(s) for s in samples])


# --- metrics and losses ----------------------------------------------------------------------------


def test_giou_and_ciou_on_hand_made_masks():
    metric = SegmentationIoU(["a", "b"])
    target = torch.zeros(3, 4, 4, dtype=torch.uint8)
    target[0, :2, :2] = 1  # 4 pixels
    target[1, :, :] = 1  # 16 pixels
    pred = torch.zeros(3, 4, 4, dtype=torch.bool)
    pred[0, :1, :2] = True  # I=2, U=4 -> 0.5
    pred[1, :2, :] = True  # I=8, U=16 -> 0.5
    # mask 2: empty target, empty prediction: U = 0 counts as right (1.0)
    metric.update(pred, target, ["a", "b", "b"])
    out = metric.compute()
    assert out["giou"] == pytest.approx((0.5 + 0.5 + 1.0) / 3)
    assert out["ciou"] == pytest.approx((2 + 8) / (4 + 16))
    assert out["giou_a"] == pytest.approx(0.5) and out["giou_b"] == pytest.approx(0.75)
    assert out["ciou_b"] == pytest.approx(8 / 16)


def test_ignored_pixels_count_in_neither_metric_nor_loss():
    target = torch.zeros(1, 4, 4, dtype=torch.uint8)
    target[0, :2, :2] = 1
    target[0, 3, :] = 255
    pred = torch.zeros(1, 4, 4, dtype=torch.bool)
    pred[0, :2, :2] = True
    pred[0, 3, :] = True  # wrong only where ignored
    metric = SegmentationIoU()
    metric.update(pred, target, ["x"])
    assert metric.compute()["giou"] == 1.0 and metric.compute()["ciou"] == 1.0
    logits = torch.randn(1, 4, 4)
    other = logits.clone()
    other[0, 3] = -logits[0, 3] * 50  # anything at ignored pixels
    assert torch.equal(torch.stack(mask_losses(logits, target)), torch.stack(mask_losses(other, target)))


def test_ciou_weighs_each_mask_by_its_original_area():
    """Two masks at 4 x 4: one from a 4x larger image counts 4x in cIoU, not in gIoU."""
    target = torch.zeros(2, 4, 4, dtype=torch.uint8)
    target[:, :2, :2] = 1
    pred = torch.zeros(2, 4, 4, dtype=torch.bool)
    pred[0, :2, :2] = True  # IoU 1
    pred[1, :1, :2] = True  # IoU 0.5
    metric = SegmentationIoU()
    metric.update(pred, target, ["x", "x"], scale=torch.tensor([1.0, 4.0]))
    out = metric.compute()
    assert out["giou"] == pytest.approx(0.75)
    assert out["ciou"] == pytest.approx((4 + 2 * 4) / (4 + 4 * 4))


def test_dice_and_bce_follow_lisa_without_ignored_pixels():
    logits, target = torch.randn(2, 8, 8), (torch.rand(2, 8, 8) > 0.5).to(torch.uint8)
    bce, dice = mask_losses(logits, target)
    x, t = logits.flatten(1), target.flatten(1).float()
    ref_bce = torch.nn.functional.binary_cross_entropy_with_logits(x, t, reduction="none").mean(1).mean()
    p = x.sigmoid()
    ref_dice = (
        1 - (2 * (p / 1000 * t).sum(-1) + 1e-6) / ((p / 1000).sum(-1) + (t / 1000).sum(-1) + 1e-6)
    ).mean()
    assert bce == pytest.approx(float(ref_bce), rel=1e-5) and dice == pytest.approx(float(ref_dice), rel=1e-5)


# --- where the prompts are read ----------------------------------------------------------------------


@pytest.mark.parametrize("seg_position", ["at", "before"])
def test_seg_states_are_read_at_every_seg_token_under_left_and_right_padding(seg_position):
    module = segmenter(f"family.model.seg_position={seg_position}").eval()
    model = module.model
    samples = [
        sample("the red circle and the blue square and the green one.", n_seg=3),
        sample("it.", n_seg=1),
    ]
    right, left = batch(module, samples), batch(module, samples, prompts=True)
    assert right["masks"].shape[0] == left["masks"].shape[0] == 4
    assert left["attention_mask"][1, 0] == 0 and right["attention_mask"][1, -1] == 0  # padded both ways
    seg = model.seg_token_id
    for b in (right, left):
        with torch.no_grad():
            hidden, _ = model.backbone(b["input_ids"], b["attention_mask"], b["pixel_values"])
            states, rows = model.prompt_states(hidden, b["input_ids"], b["attention_mask"])
        assert rows.tolist() == [0, 0, 0, 1]
        shift = 0 if seg_position == "at" else 1
        where = [(i, j - shift) for i, j in (b["input_ids"] == seg).nonzero().tolist()]
        assert all(b["input_ids"][i, j + shift] == seg for i, j in where)
        assert torch.equal(states, torch.stack([hidden[i, j] for i, j in where]))
    with torch.no_grad():
        a, b = (
            model(**{k: right[k] for k in ("input_ids", "attention_mask", "pixel_values")}),
            model(**{k: left[k] for k in ("input_ids", "attention_mask", "pixel_values")}),
        )
    torch.testing.assert_close(a["mask_logits"], b["mask_logits"], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("pool", ["last", "mean"])
def test_the_fused_prompt_pools_the_same_state_under_left_and_right_padding(pool):
    module = segmenter("prompt=fused", f"family.model.pool={pool}").eval()
    samples = [sample("the red circle on the far left of the picture."), sample("it.")]
    right, left = batch(module, samples), batch(module, samples, prompts=True)
    assert SEG_TOKEN not in module.tokenizer.decode(right["input_ids"][0])  # the prompt alone
    assert "labels" not in right and right["masks"].shape[0] == 2
    with torch.no_grad():
        outs = [
            module.model(b["input_ids"], b["attention_mask"], b["pixel_values"])["mask_logits"]
            for b in (right, left)
        ]
    torch.testing.assert_close(outs[0], outs[1], atol=1e-4, rtol=1e-4)


def test_a_sample_whose_seg_tokens_and_masks_disagree_is_skipped_as_malformed():
    module = segmenter()
    bad = sample("two things.", n_seg=2)
    bad["meta"]["masks"] = bad["meta"]["masks"][:1]
    from vlm.data.datasets import SkipSample

    with pytest.raises(SkipSample, match=r"malformed mask: 2 \[SEG\] tokens in the answer for 1 masks"):
        module.processor.encode(bad)


# --- what trains -------------------------------------------------------------------------------------


def trained_and_frozen(module) -> tuple[dict, dict]:
    named = dict(module.model.named_parameters())
    return {n: p for n, p in named.items() if p.requires_grad}, {
        n: p for n, p in named.items() if not p.requires_grad
    }


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["prompt=fused", "sam.image_encoder=own"],
        ["mode=vlm", "vlm=tiny_qwen2_vl"],
    ],
    ids=["separate-seg_token", "separate-fused-own", "vlm-seg_token"],
)
def test_gradients_reach_the_connectors_lora_and_decoder_and_never_a_frozen_part(overrides):
    """The segment stage's recipe: frozen tower (and SAM encoder), LoRA on the LLM, connectors
    and mask decoder trained. One step: every trained tensor has a gradient, no frozen one."""
    tune = ["stage.tune.vision_tower.type=frozen", "stage.tune.llm.type=lora"]
    module = segmenter(*tune, *overrides)
    trained, frozen = trained_and_frozen(module)
    names = " ".join(trained)
    assert "lora_A" in names and "text_sam" in names and "mask_decoder" in names
    assert ("image_sam" in names) == ("sam.image_encoder=own" not in overrides)
    assert not any(
        "vision" in n and "lora" not in n for n in trained if "backbone" in n and "connector" not in n
    )
    before = {n: p.detach().clone() for n, p in frozen.items()}
    b = batch(
        module, [sample("the red circle.", colour="red"), sample("the blue one.", n_seg=1, colour="blue")]
    )
    module.train()
    opt = torch.optim.SGD(trained.values(), lr=0.1)
    for _ in range(2):  # LoRA's B starts at zero, so A's first gradient is zero: look at the second
        opt.zero_grad()
        module(b)["loss"].backward()
        opt.step()
    missing = [n for n, p in trained.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient reached {missing[:5]}"
    assert all(p.grad is None for p in frozen.values())
    assert all(torch.equal(p, before[n]) for n, p in frozen.items())


# --- both modes, every VLM class -------------------------------------------------------------------


@pytest.mark.parametrize("prompt", ["seg_token", "fused"])
@pytest.mark.parametrize("vlm", VLMS)
def test_every_vlm_class_gives_one_mask_per_prompt_and_trains_its_connectors(vlm, prompt):
    """Through vlm-train's validation first (a meta-device build with a stand-in tokenizer),
    then built for real: masks, losses and gradients."""
    from vlm.runtime.validate import check_model

    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        check_model(
            compose(
                "train", overrides=["experiment=sam_shapes", "mode=vlm", f"vlm={vlm}", f"prompt={prompt}"]
            )
        )
    module = segmenter("mode=vlm", f"vlm={vlm}", f"prompt={prompt}")
    assert type(module.model.backbone).__name__ != "SeparateBackbone"
    samples = [sample("the red circle and the square.", n_seg=2, colour="red"), sample("it.", colour="blue")]
    b = batch(module, samples)
    out = module(b)
    n = 3 if prompt == "seg_token" else 2
    assert out["mask_logits"].shape == (n, module.model.mask_size, module.model.mask_size) == b["masks"].shape
    assert torch.isfinite(out["loss"]) and ("ce" in out) == (prompt == "seg_token")
    out["loss"].backward()
    for part in ("connector", "text_sam", "image_sam", "mask_decoder"):
        grads = [p.grad for p in module.model.parts()[part].parameters() if p.requires_grad]
        assert grads and all(g is not None for g in grads), part


def test_an_unsupported_vlm_type_a_vlm_without_its_mode_and_4bit_on_a_cpu_are_one_line_errors(tmp_path):
    from vlm.runtime.errors import ConfigError
    from vlm.runtime.validate import validate

    with pytest.raises(
        ValueError, match=r"^VLM model_type .blip-2. is not supported: choose from llava, idefics3"
    ):
        from transformers import Blip2Config

        from vlm.families.sam_segmentation.vlms import backbone_class

        backbone_class(Blip2Config())
    with pytest.raises(
        Exception, match=r"vlm names 'tiny_paligemma' but mode=separate builds encoder \+ llm: add mode=vlm"
    ):
        segmenter("vlm=tiny_paligemma")
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["experiment=sam_shapes", "mode=vlm", "vlm.load_in=4bit"])
    if not torch.cuda.is_available():
        with pytest.raises(
            ConfigError, match=r"^vlm.load_in=4bit: 4/8-bit loading .* CUDA device; this machine has none$"
        ):
            validate(cfg, data=False)


# --- the default run, as a user runs it --------------------------------------------------------------


def test_sam_shapes_trains_scores_draws_and_reloads(shapesworld, tmp_path):
    """A short experiment=sam_shapes on the tiny ShapesWorld refs: gIoU / cIoU per type in val
    and test, the best checkpoint picked by val/giou, overlays in the run and in wandb,
    prediction rows, the peak memory logged; the checkpoint reloads ([SEG] and all) to the same
    masks."""
    from runs import experiment_overrides, load_ckpt, metrics_rows, run_train, steps

    from vlm.core.lit_module import VLMLitModule

    run = tmp_path / "run"
    overrides = [*experiment_overrides("sam_shapes", shapesworld), *steps(4, 2), "logger=default"]
    metrics = run_train([*overrides, "prompt=seg_token", "data.max_val_samples=16"], run)
    for split in ("val", "test"):
        assert {f"{split}/giou", f"{split}/ciou", f"{split}/giou_attribute", f"{split}/bce"} <= set(metrics)
        assert 0.0 <= metrics[f"{split}/giou"] <= 1.0
    assert (run / "overlays" / "val_step4.png").is_file() and (run / "overlays" / "test_step4.png").is_file()
    sheet = Image.open(run / "overlays" / "val_step4.png")
    assert sheet.width == 3 * 64 and sheet.height == 8 * 64  # image | target | prediction, 8 rows
    rows = [json.loads(line) for line in (run / "predictions" / "val_step4.jsonl").read_text().splitlines()]
    assert (
        rows
        and all(0.0 <= x <= 1.0 for r in rows for x in r["iou"])
        and rows[0]["qtype"] in ("attribute", "spatial", "reasoning")
    )
    (wandb_run,) = (run / "wandb").glob("offline-run-*")  # csv + wandb, offline without a key
    assert list(wandb_run.glob("files/media/images/val/overlays*.png"))
    logged = [r for r in metrics_rows(run) if r.get("memory/peak_gib_fit")]
    assert logged and float(logged[0]["memory/peak_gib_fit"]) > 0.1
    (best,) = (run / "checkpoints").glob("best-*.ckpt")
    assert any("'monitor': 'val/giou'" in key for key in load_ckpt(best)["callbacks"])
    module = VLMLitModule.from_checkpoint(best)
    assert module.hparams.objective["_target_"].endswith("SegmentationObjective")
    b = batch(module, [sample("the red circle.", colour="red")])
    again = VLMLitModule.from_checkpoint(best)
    assert torch.equal(torch.stack(module.segment(b)), torch.stack(again.segment(b)))


def test_the_baselines_score_the_empty_mask_and_the_largest_object(shapesworld, tmp_path):
    """By hand: an expression naming its image's largest object scores 1 under the
    largest-object baseline, one naming a smaller object its overlap; the empty mask 0. Then
    ``vlm-baselines`` on the tiny ShapesWorld refs, through the data config."""
    from runs import cli, data_overrides

    from vlm.families.sam_segmentation.baselines import score

    big, small = square(0, 0, 40, 40), square(50, 50, 60, 60)
    recs = [
        {"image": "a.png", "qtype": "attribute", "masks": [big], "ignore": [], "height": 64, "width": 64},
        {"image": "a.png", "qtype": "spatial", "masks": [small], "ignore": [], "height": 64, "width": 64},
    ]
    out = score(recs, {"a.png": big}, 64, ["attribute", "spatial"])
    assert out["empty"]["giou"] == 0.0 and out["empty"]["ciou"] == 0.0
    assert out["largest"]["giou_attribute"] == 1.0 and out["largest"]["giou_spatial"] == 0.0
    assert out["largest"]["giou"] == 0.5
    run = cli(
        "vlm-baselines", ["experiment=sam_shapes", *data_overrides(shapesworld), "split=val"], tmp_path, 120
    )
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout)
    assert result["records"] > 0 and result["empty"]["giou"] == 0.0
    assert 0.0 < result["largest"]["giou"] <= 1.0 and sum(result["per_type"].values()) == result["records"]

"""``lmms-eval --model vlm_lab`` on the shared short trained run (``trained_run`` in conftest):
the real console script through our entry point and task, checked against our own generation."""

import json
from pathlib import Path

import pytest
import torch
from lmms_eval.api.instance import Instance
from lmms_eval.models.registry_v2 import ModelRegistryV2
from PIL import Image
from runs import cli, one_thread, shapesworld_root

import vlm.eval.lmms.tasks
from vlm.core.lit_module import VLMLitModule
from vlm.core.metrics import normalize_answer
from vlm.core.tokenizer import IGNORE_INDEX
from vlm.eval.lmms.models.vlm_lab import VLMLab

TASKS = Path(vlm.eval.lmms.tasks.__path__[0])
LIMIT = 24


@pytest.fixture
def plugin_env(shapesworld, tmp_path, monkeypatch):
    """What the README's command sets: the ShapesWorld folder, offline HF datasets (their cache in
    tmp); no ``LMMS_EVAL_PLUGINS``, so ``vlm_lab`` comes from the entry point alone."""
    monkeypatch.delenv("LMMS_EVAL_PLUGINS", raising=False)
    monkeypatch.setenv("SHAPESWORLD_DIR", str(shapesworld_root(shapesworld)))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))


def lmms_eval(model_args: str, cwd: Path, *extra: str):
    args = ["--model", "vlm_lab", "--model_args", model_args, "--include_path", str(TASKS)]
    return cli("lmms-eval", [*args, "--tasks", "shapesworld_vqa", *extra], cwd, timeout=240)


def test_vlm_lab_is_registered_by_the_installed_entry_point():
    """lmms-eval's own loader of the ``lmms_eval.models`` group alone finds ``vlm_lab`` (missing:
    the venv's install predates the entry point; ``pip install -e . --no-deps``)."""
    registry = ModelRegistryV2()
    registry.load_entrypoint_manifests()
    assert registry.get_model_class("vlm_lab") is VLMLab


def prompt(module: VLMLitModule, image: Image.Image, record: dict) -> dict:
    turns = [record["conversations"][0], {"from": "gpt", "value": ""}]
    return module.processor.encode_prompt({"image": image, "conversations": turns})


def our_answers(module: VLMLitModule, root: Path, records: list[dict], blank: bool = False) -> list[str]:
    """Greedy answers as ``shapesworld_vqa.yaml`` asks (16 new tokens, cut at a newline), one
    prompt at a time through our processor; ``blank``: a black image instead of the record's."""
    answers = []
    for r in records:
        image = Image.new("RGB", (64, 64)) if blank else Image.open(root / r["image"]).convert("RGB")
        batch = module.processor.collate_prompts([prompt(module, image, r)])
        with torch.inference_mode(), one_thread():
            (answer,) = module.generate(batch, max_new_tokens=16, do_sample=False)
        answers.append(answer.split("\n")[0].strip())
    return answers


def test_lmms_eval_scores_what_our_own_generation_answers(plugin_env, trained_run, shapesworld, tmp_path):
    ckpt = trained_run[0] / "checkpoints" / "last.ckpt"
    results = tmp_path / "results"
    extra = ["--limit", str(LIMIT), "--batch_size", "8", "--output_path", str(results), "--log_samples"]
    proc = lmms_eval(f"ckpt={ckpt}", tmp_path, *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (scores,) = results.rglob("*_results.json")
    score = json.loads(scores.read_text())["results"]["shapesworld_vqa"]["exact_match,none"]
    (samples,) = results.rglob("*_samples_shapesworld_vqa.jsonl")
    logged = {(s := json.loads(line))["doc_id"]: s["filtered_resps"] for line in samples.open()}

    root = shapesworld_root(shapesworld)
    records = json.loads((root / "llava_test.json").read_text())[:LIMIT]
    module = VLMLitModule.from_checkpoint(ckpt)
    ours = our_answers(module, root, records)
    # the comparison has teeth: this checkpoint's answers depend on the question and on the image
    assert len(set(ours)) > 1 and our_answers(module, root, records, blank=True) != ours
    assert [logged[i] for i in range(LIMIT)] == ours
    answers = [r["conversations"][1]["value"] for r in records]
    hits = [normalize_answer(a) == normalize_answer(b) for a, b in zip(ours, answers, strict=True)]
    assert score == pytest.approx(sum(hits) / LIMIT)


UNKNOWN = (
    "ConfigError: vlm_lab: unknown model_args temperature; it takes ckpt=<path.ckpt> "
    "(batch size and device: lmms-eval's --batch_size and --device)"
)


@pytest.mark.parametrize(
    ("model_args", "line"),
    [
        ("ckpt={missing}", "CheckpointError: checkpoint {missing} does not exist"),
        pytest.param("ckpt={ckpt},temperature=0", UNKNOWN, marks=pytest.mark.slow),  # 12 s of lmms-eval start
    ],
    ids=["missing_ckpt", "unknown_arg"],
)
def test_a_bad_model_arg_fails_in_one_line(plugin_env, trained_run, tmp_path, model_args, line):
    paths = {"ckpt": trained_run[0] / "checkpoints" / "last.ckpt", "missing": tmp_path / "no_such.ckpt"}
    proc = lmms_eval(model_args.format(**paths), tmp_path, "--limit", "2")
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [line.format(**paths)]


def test_loglikelihood_is_the_models_own_loss_on_the_continuation(trained_run, shapesworld):
    """Summed log-probabilities equal the teacher-forced loss of the model's label path on the
    same tokens, and ``is_greedy`` holds for the answer greedy decoding gives, not for another."""
    root = shapesworld_root(shapesworld)
    records = json.loads((root / "llava_test.json").read_text())[:8]
    lm = VLMLab(ckpt=str(trained_run[0] / "checkpoints" / "last.ckpt"), batch_size=2, device="cpu")
    greedy, doc = next(
        (a, r) for a, r in zip(our_answers(lm.module, root, records), records, strict=True) if a
    )
    other = next(w for w in ("red", "blue", "circle") if w != greedy)
    lm.task_dict = {"sw": {"test": [doc]}}
    question = doc["conversations"][0]["value"].removeprefix("<image>\n")
    visual = lambda d: [Image.open(root / d["image"])]  # noqa: E731
    meta = {"task": "sw", "doc_id": 0, "repeats": 1}
    # a leading space, as lmms-eval's multiple_choice puts its target delimiter before each choice
    requests = [
        Instance("loglikelihood", (question, f" {c}", visual, 0, "sw", "test"), 0, meta)
        for c in (greedy, other)
    ]
    with one_thread():
        (lp_greedy, is_greedy), (lp_other, other_is_greedy) = lm.loglikelihood(requests)
    assert is_greedy and not other_is_greedy

    item = prompt(lm.module, Image.open(root / doc["image"]).convert("RGB"), doc)
    for cont, logprob in ((greedy, lp_greedy), (other, lp_other)):
        ids = torch.tensor(lm.tokenizer(cont, add_special_tokens=False)["input_ids"])
        input_ids = torch.cat([item["input_ids"], ids])[None]
        labels = torch.cat([torch.full_like(item["input_ids"], IGNORE_INDEX), ids])[None]
        with torch.inference_mode(), one_thread():
            out = lm.module.model(input_ids, torch.ones_like(input_ids), item["pixel_values"][None], labels)
        assert logprob == pytest.approx(-float(out["loss"]) * len(ids), rel=1e-4, abs=1e-4)

"""Benchmarks: the official answer normalisations and scores by hand-computed values, the readers on
files written in the published layouts, one-line errors for a folder in the wrong shape, and one
``vlm-eval benchmark=vqav2`` run on the shared trained checkpoint."""

import json
import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from PIL import Image
from runs import cli, shapesworld_root

from vlm.cli.common import CONFIG_DIR
from vlm.core.metrics import evalai_answer, normalize_answer
from vlm.data.datasets import BadSampleError
from vlm.eval.base import BenchmarkError
from vlm.eval.benchmarks import BENCHMARKS, build_benchmark
from vlm.eval.consensus import consensus_accuracy
from vlm.eval.gqa import GQA
from vlm.eval.mme import MME, mme_answer
from vlm.eval.pope import POPE, pope_answer
from vlm.eval.runner import prompt_dataset
from vlm.eval.textvqa import TextVQA
from vlm.eval.vizwiz import VizWiz
from vlm.eval.vqav2 import VQAv2, vqav2_accuracy
from vlm.runtime.errors import expected_error


def write_json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


# -- the normalisations ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "normalised"),
    [
        ("don't", "don't"),  # the apostrophe is not in the official punctuation list
        ("it's", "it's"),
        ("dont", "don't"),  # the contractions map restores it
        ("10,000", "10000"),  # digit-comma-digit: every mark is deleted, none becomes a space
        ("1,000 dogs/cats", "1000 dogscats"),
        ("left_side", "left side"),  # a mark touching no space becomes one
        ("1, 2", "1 2"),  # a mark touching a space is deleted
        ("Two dogs.", "2 dogs"),  # final period gone, lower case, number word as digit
        ("the cat's toy", "cat's toy"),  # article dropped
        ("3.5 ft", "3.5 ft"),  # a period before a digit stays
        ("none\n", "0"),
        ("t-shirt", "t shirt"),
        ("Yes!", "yes"),
    ],
)
def test_normalize_answer_is_vqa_evals_processing(answer, normalised):
    assert normalize_answer(answer) == normalised


@pytest.mark.parametrize(
    ("answer", "normalised"),
    [("it's", "it 's"), ("the cat's toy", "cat 's toy"), ("Don't?", "don't"), ("10,000", "10000")],
)
def test_evalai_answer_splits_off_s_and_drops_commas_first(answer, normalised):
    assert evalai_answer(answer) == normalised


def test_consensus_accuracy_averages_the_ten_leave_one_out_subsets():
    """k matching annotators of 10: the k subsets without a match keep k-1 of them, the 10-k others
    keep k, so acc = (k min(1, (k-1)/3) + (10-k) min(1, k/3)) / 10: k=1 -> 9/30, k=2 -> (2/3 + 16/3)/10,
    k=3 -> (2 + 7)/10, k=4 -> 1."""
    expected = {0: 0.0, 1: 0.3, 2: 0.6, 3: 0.9, 4: 1.0, 10: 1.0}
    for k, acc in expected.items():
        assert consensus_accuracy("red", ["red"] * k + ["blue"] * (10 - k)) == pytest.approx(acc)


def test_vqav2_normalises_only_where_the_annotators_disagree():
    """vqaEval.py compares a unanimous answer as written; VQAv2 scores what it submits, the
    prediction normalised, so "Yes" is right either way there."""
    assert vqav2_accuracy("Yes", ["yes"] * 10) == 0.0
    assert vqav2_accuracy("Yes", ["yes"] * 9 + ["no"]) == 1.0  # normalised: 9 matches
    assert vqav2_accuracy("yes", ["yes"] * 10) == 1.0


# -- VQAv2 ----------------------------------------------------------------------------------------


def vqav2_folder(root: Path, split: str = "val2014", annotated: bool = True) -> Path:
    """Three questions in the published structure; annotators split 2/8 on the first, 3/7 on the
    second, all agree on the third."""
    qs = [(1, 42, "Is it red?"), (2, 42, "How many dogs?"), (3, 7, "What is it?")]
    questions = [{"image_id": i, "question": q, "question_id": qid} for qid, i, q in qs]
    write_json(
        root / f"v2_OpenEnded_mscoco_{split}_questions.json", {"data_subtype": split, "questions": questions}
    )
    answers = {1: ["yes"] * 2 + ["no"] * 8, 2: ["2"] * 3 + ["3"] * 7, 3: ["t-shirt"] * 10}
    types = {1: "yes/no", 2: "number", 3: "other"}
    annotations = [
        {
            "question_id": qid,
            "image_id": i,
            "question_type": "what",
            "answer_type": types[qid],
            "multiple_choice_answer": answers[qid][-1],
            "answers": [
                {"answer": a, "answer_confidence": "yes", "answer_id": n + 1}
                for n, a in enumerate(answers[qid])
            ],
        }
        for qid, i, _ in qs
    ]
    if annotated:
        write_json(root / f"v2_mscoco_{split}_annotations.json", {"annotations": annotations})
    return root


def test_vqav2_reads_the_published_files_and_scores_per_answer_type(tmp_path):
    bench = VQAv2(vqav2_folder(tmp_path), "val2014")
    items = bench.items()
    assert [it.id for it in items] == ["1", "2", "3"]
    assert items[0].image_path == tmp_path / "val2014" / "COCO_val2014_000000000042.jpg"
    assert bench.prompt(items[0]) == "<image>\nIs it red?\nAnswer the question using a single word or phrase."
    # "Yes." -> "yes": 2 matches -> 0.6; "two" -> "2": 3 matches -> 0.9; "T-Shirt" -> "t shirt",
    # which the unanimous "t-shirt" (compared as written) does not match -> 0.
    scores = bench.score({"1": "Yes.", "2": "two", "3": "T-Shirt"})
    assert scores["accuracy"] == pytest.approx((0.6 + 0.9 + 0.0) / 3)
    assert scores["accuracy/yes_no"] == pytest.approx(0.6)
    assert scores["accuracy/number"] == pytest.approx(0.9)
    assert scores["accuracy/other"] == 0.0
    assert bench.submission({"1": "Yes.", "2": "two"}) == [
        {"question_id": 1, "answer": "yes"},
        {"question_id": 2, "answer": "2"},
        {"question_id": 3, "answer": ""},  # skipped: the server wants every question
    ]


def test_vqav2_test_dev_has_no_annotations_so_only_a_submission(tmp_path):
    bench = VQAv2(vqav2_folder(tmp_path, "test-dev2015", annotated=False), "test-dev2015", limit=2)
    assert [it.answer for it in bench.items()] == [None, None]
    assert bench.items()[0].image_path.name == "COCO_test2015_000000000042.jpg"
    assert bench.score({"1": "yes", "2": "2"}) == {}
    assert bench.submission({"1": "yes", "2": "2"}) == [
        {"question_id": 1, "answer": "yes"},
        {"question_id": 2, "answer": "2"},
    ]


def test_a_missing_or_malformed_file_is_one_line_naming_it(tmp_path):
    questions = tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json"
    cases = [
        (None, f"{questions}: no such file (expected the VQAv2 val2014 questions)"),
        ('{"questions": [', f"{questions}: malformed JSON (Expecting value at line 1 column 16)"),
        ('{"question": []}', f"{questions}: expected a JSON object with a 'questions' list"),
        ('{"questions": [{"question": "Why?"}]}', f"{questions}: record 0 of 'questions' has no 'image_id'"),
    ]
    for text, message in cases:
        if text is not None:
            questions.write_text(text)
        with pytest.raises(BenchmarkError) as err:
            VQAv2(tmp_path, "val2014").items()
        assert str(err.value) == message
        assert expected_error(err.value) is err.value  # vlm-eval says it in one line and exits 1
    with pytest.raises(BenchmarkError, match=r"^vqav2: the benchmark folder \S+/nowhere does not exist$"):
        VQAv2(tmp_path / "nowhere", "val2014").items()


# -- TextVQA, VizWiz, GQA ---------------------------------------------------------------------------


def test_textvqa_normalises_both_sides_with_evalai(tmp_path):
    answers = ["Coca-Cola"] * 2 + ["coca cola"] + ["pepsi"] * 7  # all three read "coca cola"
    data = [
        {
            "question_id": 5,
            "question": "What brand?",
            "image_id": "abc",
            "answers": answers,
            "set_name": "val",
        },
        {"question_id": 6, "question": "What year?", "image_id": "def", "answers": ["1,999"] * 10},
    ]
    write_json(tmp_path / "TextVQA_0.5.1_val.json", {"dataset_name": "textvqa", "data": data})
    bench = TextVQA(tmp_path, "val")
    assert [it.image_path for it in bench.items()] == [
        tmp_path / "train_images" / f"{i}.jpg" for i in ("abc", "def")
    ]
    scores = bench.score({"5": "COCA-COLA", "6": "1999."})
    assert scores == {"accuracy": pytest.approx((0.9 + 1.0) / 2)}


def test_vizwiz_normalises_the_prediction_only(tmp_path):
    def record(image, answers, answer_type):
        given = [{"answer": a, "answer_confidence": "yes"} for a in answers]
        return {
            "image": image,
            "question": "What?",
            "answers": given,
            "answerable": 1,
            "answer_type": answer_type,
        }

    data = [
        record(
            "VizWiz_val_00000000.jpg", ["Two"] * 4 + ["3"] * 6, "number"
        ),  # "two" -> "2": no raw "Two" matches
        record("VizWiz_val_00000001.jpg", ["2"] * 3 + ["3"] * 7, "number"),  # "Two" -> "2": 3 match
        record("VizWiz_val_00000002.jpg", ["unanswerable"] * 10, "unanswerable"),
    ]
    write_json(tmp_path / "val.json", data)
    bench = VizWiz(tmp_path, "val")
    assert bench.items()[0].image_path == tmp_path / "val" / "VizWiz_val_00000000.jpg"
    assert "respond with 'Unanswerable'" in bench.prompt(bench.items()[0])
    preds = {
        "VizWiz_val_00000000.jpg": "two",
        "VizWiz_val_00000001.jpg": "Two",
        "VizWiz_val_00000002.jpg": "Unanswerable.",
    }
    scores = bench.score(preds)
    assert scores["accuracy/number"] == pytest.approx(0.45)
    assert scores["accuracy/unanswerable"] == 1.0
    assert scores["accuracy"] == pytest.approx((0 + 0.9 + 1) / 3)
    assert bench.submission(preds)[2] == {"image": "VizWiz_val_00000002.jpg", "answer": "unanswerable"}


def test_gqa_exact_match_overall_and_per_structural_type(tmp_path):
    def q(image, answer, structural):
        return {"imageId": image, "question": "?", "answer": answer, "types": {"structural": structural}}

    questions = {
        "201": q("n1", "yes", "verify"),
        "202": q("n1", "left", "choose"),
        "203": q("n2", "red", "query"),
    }
    write_json(tmp_path / "testdev_balanced_questions.json", questions)
    bench = GQA(tmp_path, "testdev")
    assert bench.items()[2].image_path == tmp_path / "images" / "n2.jpg"
    scores = bench.score({"201": "Yes.", "202": "the left", "203": "blue"})
    assert scores == {
        "accuracy": pytest.approx(2 / 3),
        "accuracy/choose": 1.0,
        "accuracy/query": 0.0,
        "accuracy/verify": 1.0,
    }


# -- POPE and MME -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "read"),
    [
        ("Yes, there is a dog.", "yes"),
        ("No.", "no"),
        ("There is not a car. No doubt.", "no"),  # "not" in the first sentence
        ("Yes. No.", "yes"),  # only the first sentence counts
        ("NO", "yes"),  # case as written
        ("no, none", "no"),
    ],
)
def test_pope_reads_answers_as_its_script(answer, read):
    assert pope_answer(answer) == read


def test_pope_metrics_per_split_with_yes_as_positive(tmp_path):
    labels = ["yes", "yes", "yes", "no", "no", "no"]
    lines = [
        {
            "question_id": i + 1,
            "image": "COCO_val2014_000000000001.jpg",
            "text": "Is there a dog?",
            "label": y,
        }
        for i, y in enumerate(labels)
    ]
    (tmp_path / "coco_pope_random.json").write_text("".join(json.dumps(x) + "\n" for x in lines))
    bench = POPE(tmp_path, "random")
    assert bench.items()[0].image_path == tmp_path / "val2014" / "COCO_val2014_000000000001.jpg"
    answers = ["Yes", "Yes, it is.", "No", "yes", "No", "There is not."]  # TP TP FN FP TN TN
    scores = bench.score({f"random/{i + 1}": a for i, a in enumerate(answers)})
    precision, recall = 2 / 3, 2 / 3
    assert scores == pytest.approx(
        {
            "random/accuracy": 4 / 6,
            "random/precision": precision,
            "random/recall": recall,
            "random/f1": 2 * precision * recall / (precision + recall),
            "random/yes_ratio": 3 / 6,
            "f1": 2 / 3,
            "accuracy": 4 / 6,
        }
    )
    with pytest.raises(
        BenchmarkError, match=re.escape(f"{tmp_path / 'coco_pope_popular.json'}: no such file")
    ):
        POPE(tmp_path, "all").items()


def mme_folder(root: Path) -> Path:
    """existence (images beside their questions), artwork (images/ + questions_answers_YN/) and
    code_reasoning (.png), two questions per image."""
    files = {
        "existence/0001.txt": "Is there a dog? Please answer yes or no.\tYes\nIs there a cat?\tNo\n",
        "existence/0002.txt": "Is there a car?\tYes\nIs there a bus?\tNo\n",
        "artwork/questions_answers_YN/10.txt": "Is this by Monet?\tYes\nIs this by Dali?\tNo\n",
        "code_reasoning/0003.txt": "Does it print 3?\tNo\nDoes it print 4?\tYes\n",
    }
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    (root / "artwork" / "images").mkdir()
    for image in (
        "existence/0001.jpg",
        "existence/0002.jpg",
        "artwork/images/10.jpg",
        "code_reasoning/0003.png",
    ):
        (root / image).touch()
    return root


def test_mme_acc_acc_plus_scores_and_totals_of_the_subtasks_present(tmp_path):
    bench = MME(mme_folder(tmp_path), None)
    items = {it.id: it for it in bench.items()}
    assert items["artwork/10/1"].image_path == tmp_path / "artwork" / "images" / "10.jpg"
    assert items["code_reasoning/0003/2"].image_path == tmp_path / "code_reasoning" / "0003.png"
    assert items["existence/0001/1"].question == "Is there a dog? Please answer yes or no."
    assert [mme_answer(a) for a in ("Yes", "yes, it is", "Not sure", "Maybe yes", "NO.")] == [
        "yes",
        "yes",
        "no",
        "other",
        "no",
    ]
    predictions = {
        "existence/0001/1": "Yes",
        "existence/0001/2": "No",  # image 1: both right
        "existence/0002/1": "No",
        "existence/0002/2": "No",  # image 2: one right -> acc 3/4, acc+ 1/2 -> 125
        "artwork/10/1": "yes, it is",
        "artwork/10/2": "No",  # both right -> 200
        "code_reasoning/0003/1": "Not sure",  # "not " holds "no": right
        "code_reasoning/0003/2": "Maybe yes",  # "mayb": other, wrong -> acc 1/2, acc+ 0 -> 50
    }
    scores = bench.score(predictions)
    assert scores["existence/acc"] == 0.75 and scores["existence/acc_plus"] == 0.5
    assert scores["existence/score"] == pytest.approx(125)
    assert scores["artwork/score"] == pytest.approx(200)
    assert scores["code_reasoning/score"] == pytest.approx(50)
    assert scores["perception"] == pytest.approx(325) and scores["cognition"] == pytest.approx(50)
    assert bench.info()["subtasks"] == ["existence", "artwork", "code_reasoning"]
    (tmp_path / "existence" / "0002.txt").write_text("Is there a car? Yes\n")
    with pytest.raises(
        BenchmarkError, match=re.escape(f"{tmp_path / 'existence' / '0002.txt'}: line 1 is not")
    ):
        MME(tmp_path, None).items()


# -- running ----------------------------------------------------------------------------------------


def test_a_missing_image_is_skipped_and_counted_or_stops_in_one_line(tmp_path):
    bench = VQAv2(vqav2_folder(tmp_path), "val2014", limit=1)
    skipping = prompt_dataset(bench, None, "skip")
    assert skipping[0] is None and skipping.bad_samples == {"missing image": 1}
    image = tmp_path / "val2014" / "COCO_val2014_000000000042.jpg"
    with pytest.raises(
        BadSampleError, match=re.escape(f"vqav2 val2014 record 0 (id 1): missing image: {image}")
    ):
        prompt_dataset(bench, None, "raise")[0]


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_each_benchmark_option_builds_its_class_with_llava_prompts(name):
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        cfg = compose("eval", overrides=[f"benchmark={name}"])
    options = {k: v for k, v in cfg.benchmark.items() if k not in ("name", "on_bad_sample", "root")}
    bench = build_benchmark(cfg.benchmark.name, root="anywhere", **options)
    assert type(bench) is BENCHMARKS[name] and bench.prompt_suffix == type(bench).default_suffix


def test_vlm_eval_benchmark_writes_predictions_score_row_and_a_wandb_run(trained_run, shapesworld, tmp_path):
    """ShapesWorld's test questions as VQAv2 val2014 (7 of 10 annotators give its answer, 3 "none"),
    one image missing; score.json's figure is the scorer's on the predictions written."""
    out, _ = trained_run
    root = shapesworld_root(shapesworld)
    records = [r for r in json.loads((root / "llava_test.json").read_text()) if r["qtype"] != "caption"][:6]
    questions, annotations = [], []
    for qid, rec in enumerate(records, 1):
        question = rec["conversations"][0]["value"].split("\n", 1)[-1]
        questions.append({"image_id": qid, "question": question, "question_id": qid})
        answers = [rec["conversations"][1]["value"]] * 7 + ["none"] * 3
        given = [{"answer": a, "answer_confidence": "yes", "answer_id": n + 1} for n, a in enumerate(answers)]
        annotations.append({"question_id": qid, "answer_type": "other", "answers": given})
        if qid != 2:
            image = tmp_path / "vqav2" / "val2014" / f"COCO_val2014_{qid:012d}.jpg"
            image.parent.mkdir(parents=True, exist_ok=True)
            Image.open(root / rec["image"]).convert("RGB").save(image)
    bench_root = tmp_path / "vqav2"
    write_json(bench_root / "v2_OpenEnded_mscoco_val2014_questions.json", {"questions": questions})
    write_json(bench_root / "v2_mscoco_val2014_annotations.json", {"annotations": annotations})
    args = [
        f"ckpt={out / 'checkpoints' / 'last.ckpt'}",
        "benchmark=vqav2",
        f"benchmark.root={bench_root}",
        "benchmark.limit=5",
        "batch_size=2",
        f"out_dir={tmp_path / 'result'}",
    ]
    proc = cli("vlm-eval", args, tmp_path, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = tmp_path / "result"
    rows = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["1", "2", "3", "4", "5"] and rows[1]["prediction"] is None
    score = json.loads((folder / "score.json").read_text())
    assert (score["items"], score["skipped"], score["scored"]) == (5, 1, 4)
    predictions = {r["id"]: r["prediction"] for r in rows if r["prediction"] is not None}
    recomputed = VQAv2(bench_root, "val2014", limit=5).score(predictions)["accuracy"]
    assert score["scores"]["accuracy"] == pytest.approx(recomputed)
    assert f"vqav2/accuracy: {recomputed:.4f}" in proc.stdout
    assert (folder / "row.md").read_text() == f"| vqav2 | val2014 | 4 | accuracy {recomputed:.4f} |\n"
    assert len(json.loads((folder / "submission.json").read_text())) == 5
    assert list((folder / "wandb").glob("offline-run-*"))


def test_vlm_eval_without_a_root_scores_the_checkpoints_own_shapesworld(trained_run, shapesworld, tmp_path):
    """No ``benchmark.root``: the checkpoint's ShapesWorld test split in POPE's layout, all three
    splits; the figures are the scorer's on the predictions written. A benchmark ShapesWorld does
    not write is one line."""
    out, _ = trained_run
    ckpt = f"ckpt={out / 'checkpoints' / 'last.ckpt'}"
    args = [ckpt, "benchmark=pope", "benchmark.prompt_suffix=''", "wandb=false", f"out_dir={tmp_path / 'r'}"]
    proc = cli("vlm-eval", args, tmp_path, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    score = json.loads((tmp_path / "r" / "score.json").read_text())
    root = shapesworld_root(shapesworld) / "benchmarks" / "pope"
    assert (score["split"], score["skipped"]) == ("all", 0)
    rows = [json.loads(line) for line in (tmp_path / "r" / "predictions.jsonl").read_text().splitlines()]
    assert (
        score["items"]
        == len(rows)
        == sum(len(p.read_text().splitlines()) for p in root.glob("coco_pope_*.json"))
    )
    recomputed = POPE(root, "all", prompt_suffix="").score({r["id"]: r["prediction"] for r in rows})
    assert score["scores"] == pytest.approx(recomputed)
    proc = cli("vlm-eval", [ckpt, "benchmark=textvqa"], tmp_path, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].endswith("set benchmark.root=<folder>")

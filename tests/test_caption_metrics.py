"""Caption metrics: the COCO caption evaluation's numbers, each image once across ranks, and a run that
survives a machine without Java."""

import gc
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import warnings
from pathlib import Path

import psutil
import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from vlm.core import caption_metrics
from vlm.core.caption_metrics import CaptionMetrics, approx_ptb_tokenize, score_captions, tokenize_captions

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="needs java on PATH")

REFS = {
    "1": ["A dog runs across the grass.", "a brown dog running on a lawn", "The dog is playing outside."],
    "2": ["Two cats sleep on a red sofa.", "a pair of cats napping on a couch"],
    "3": ["A man rides a bicycle down the street.", "a cyclist on a city road", "Person riding a bike."],
    "4": ["A plate of pasta with tomato sauce.", "spaghetti on a white plate"],
}
# The first reference, up to case and punctuation, which tokenization removes.
EXACT = {
    "1": "a dog runs across the grass",
    "2": "Two cats sleep on a red sofa",
    "3": "A man rides a bicycle, down the street!",
    "4": "a plate of pasta with tomato sauce .",
}
WRONG = {
    "1": "a cat on a sofa",
    "2": "a man riding a bike",
    "3": "a plate of food",
    "4": "a dog on the grass",
}
KEYS = ["bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider"]


def as_floats(scores):
    return {k: float(v) for k, v in scores.items()}


def update(metric, predictions, ids):
    metric.update([predictions[i] for i in ids], [REFS[i] for i in ids], list(ids))


@pytest.fixture(scope="module")
def java_scores():
    """One METEOR start per corpus is the expensive part (~4 s each): computed once for the module,
    noting unclosed pipes and threads left behind."""
    threads = threading.active_count()
    metric = CaptionMetrics()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        update(metric, EXACT, ["1", "2"])
        update(metric, EXACT, ["3", "4"])
        scores = {"exact": as_floats(metric.compute()), "wrong": score_captions(WRONG, REFS)}
        gc.collect()
    leaks = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    return {**scores, "leaks": leaks, "new_threads": threading.active_count() - threads}


@pytest.fixture
def no_java(monkeypatch):
    """No java on PATH, and any attempt to start a process fails the test."""
    monkeypatch.setattr(shutil, "which", lambda *args, **kwargs: None)

    def refuse(*args, **kwargs):
        raise AssertionError(f"started a process without java: {args}")

    monkeypatch.setattr(subprocess, "Popen", refuse)
    caption_metrics._warn_once.cache_clear()


@needs_java
def test_exact_captions_score_top_and_wrong_ones_low(java_scores):
    exact, wrong = java_scores["exact"], java_scores["wrong"]
    assert list(exact) == KEYS and list(wrong) == KEYS
    assert exact["bleu4"] == pytest.approx(1.0, abs=1e-6)
    assert exact["rouge_l"] == pytest.approx(1.0)
    for key in ("bleu4", "meteor", "rouge_l", "cider"):
        assert exact[key] > wrong[key] + 0.2, key
    assert wrong["bleu4"] < 1e-3 < exact["cider"] - 2


@needs_java
def test_scores_equal_pycocoevalcap_scorers_on_ptb_tokens(java_scores):
    """The COCO caption evaluation (eval.py), minus its printing and SPICE."""
    tokenizer, meteor = PTBTokenizer(), Meteor()
    try:
        for name, predictions in (("exact", EXACT), ("wrong", WRONG)):
            gts = tokenizer.tokenize({i: [{"caption": c} for c in refs] for i, refs in REFS.items()})
            res = tokenizer.tokenize({i: [{"caption": c}] for i, c in predictions.items()})
            expected = dict(zip(KEYS[:4], Bleu(4).compute_score(gts, res, verbose=0)[0], strict=True))
            expected["meteor"] = meteor.compute_score(gts, res)[0]
            expected["rouge_l"] = Rouge().compute_score(gts, res)[0]
            expected["cider"] = Cider().compute_score(gts, res)[0]
            assert java_scores[name] == pytest.approx(expected, rel=1e-6), name
    finally:
        meteor.meteor_p.kill()
        meteor.meteor_p.communicate()


@needs_java
def test_java_processes_and_pipes_are_closed(java_scores):
    assert not [p for p in psutil.Process().children(recursive=True) if "java" in p.name()]
    assert java_scores["leaks"] == [] and java_scores["new_threads"] == 0


@needs_java
def test_approximation_matches_ptb_and_line_breaks_stay_inside_their_caption():
    captions = [
        "A man's dog, running (fast) in the \"park\"... don't!",
        "black-and-white photo of a cat's toy; 3.5 m -- wow?",
        "A woman holding an umbrella [red] while it's raining at 5:30",
        "It can't be: they're 'happy' kids!",
    ]
    ptb = tokenize_captions({str(i): [c] for i, c in enumerate(captions)})
    assert [approx_ptb_tokenize(c) for c in captions] == [ptb[str(i)][0] for i in range(len(captions))]
    # PTBTokenizer ends lines at \r and U+2028 too: unguarded, "b" would receive "play".
    assert tokenize_captions({"a": ["Two dogs\u2028play\rtogether"], "b": ["A cat."]}) == {
        "a": ["two dogs play together"],
        "b": ["a cat"],
    }


def test_without_java_meteor_is_skipped_and_text_tokenized_in_python(no_java, caplog):
    metric = CaptionMetrics()
    with caplog.at_level(logging.WARNING, logger=caption_metrics.__name__):
        update(metric, WRONG, REFS)
        scores = as_floats(metric.compute())
        score_captions(EXACT, REFS)
    assert list(scores) == ["bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "cider"]
    gts = {i: [approx_ptb_tokenize(c) for c in refs] for i, refs in REFS.items()}
    res = {i: [approx_ptb_tokenize(c)] for i, c in WRONG.items()}
    expected = dict(zip(KEYS[:4], Bleu(4).compute_score(gts, res, verbose=0)[0], strict=True))
    expected["rouge_l"] = Rouge().compute_score(gts, res)[0]
    expected["cider"] = Cider().compute_score(gts, res)[0]
    assert scores == pytest.approx(expected, rel=1e-6)
    assert len([r for r in caplog.records if "java not on PATH" in r.getMessage()]) == 1


def test_spice_skip_is_logged_once(no_java, caplog):
    with caplog.at_level(logging.WARNING, logger=caption_metrics.__name__):
        score_captions(WRONG, REFS)
        score_captions(EXACT, REFS)
    spice = [r for r in caplog.records if "SPICE" in r.getMessage()]
    assert len(spice) == 1 and spice[0].levelno == logging.WARNING
    assert "offline" in spice[0].getMessage() and "\n" not in spice[0].getMessage()


def test_a_repeated_image_counts_once(no_java):
    """DistributedSampler pads a rank by repeating samples: the repeat must not weigh twice."""
    metric = CaptionMetrics()
    update(metric, WRONG, ["1", "2", "3"])
    update(metric, WRONG, ["4", "1"])
    twice = score_captions({**WRONG, "1bis": WRONG["1"]}, {**REFS, "1bis": REFS["1"]})
    scores = as_floats(metric.compute())
    assert scores == pytest.approx(score_captions(WRONG, REFS), rel=1e-6)
    assert scores != pytest.approx(twice, rel=1e-3)


@pytest.mark.filterwarnings("ignore:The ``compute`` method of metric CaptionMetrics was called before")
def test_reset_clears_the_captions(no_java):
    metric = CaptionMetrics()
    assert metric.compute() == {}
    update(metric, WRONG, REFS)
    assert metric.compute()
    metric.reset()
    assert metric.compute() == {}
    update(metric, EXACT, REFS)
    assert as_floats(metric.compute()) == pytest.approx(score_captions(EXACT, REFS), rel=1e-6)


def test_forward_accumulates_and_merge_state_joins_captions(no_java):
    metric, other = CaptionMetrics(), CaptionMetrics()
    assert metric([WRONG["1"]], [REFS["1"]], ["1"]) is None
    metric([WRONG["2"]], [REFS["2"]], ["2"])
    update(other, WRONG, ["3", "4"])
    metric.merge_state(other)
    assert as_floats(metric.compute()) == pytest.approx(score_captions(WRONG, REFS), rel=1e-6)
    with pytest.raises(TypeError):
        metric.update(["a dog"], ["a dog runs"], ["5"])


RANK_SCRIPT = textwrap.dedent(
    """
    import json, shutil, sys
    from datetime import timedelta
    import torch.distributed as dist
    from vlm.core.caption_metrics import CaptionMetrics

    shutil.which = lambda *args, **kwargs: None  # two METEOR JVMs on a busy CI box cost ~10 s

    rank, store, batches = int(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=2, timeout=timedelta(seconds=60)
    )
    metric = CaptionMetrics()
    for predictions, references, ids in batches[rank]:
        metric.update(predictions, references, ids)
    print(json.dumps({k: v.item() for k, v in metric.compute().items()}))
    dist.destroy_process_group()
    """
)


def test_two_ranks_gather_to_the_single_process_score(tmp_path, monkeypatch):
    """Each rank scores different images (rank 1 padded with a repeat of image 1) with gloo; without
    Java, which the gather does not involve."""

    def batch(ids):
        return [WRONG[i] for i in ids], [REFS[i] for i in ids], ids

    batches = json.dumps([[batch(["1", "2"])], [batch(["3"]), batch(["4", "1"])]])
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", RANK_SCRIPT, str(rank), str(tmp_path / "store"), batches],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for rank in range(2)
    ]
    try:
        outputs = [p.communicate(timeout=90) for p in ranks]
    finally:
        for p in ranks:
            p.kill()
    results = []
    for p, (out, err) in zip(ranks, outputs, strict=True):
        assert p.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert results[0] == results[1]
    monkeypatch.setattr(shutil, "which", lambda *args, **kwargs: None)
    assert results[0] == pytest.approx(score_captions(WRONG, REFS), rel=1e-6)

"""Objectives on hand-made prompt batches: what each scores and logs, per split, and that the
sample rows are made only as far as they are taken. Config-level: a ``_target_`` can only name
the kind of class its key is for."""

from itertools import islice

import pytest
import torch

from vlm.core.builder import build_model, build_objective
from vlm.core.objectives import CaptionObjective, VQAObjective


class Tokenizer:
    """Decodes ids as characters (0 is a special token)."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(int(i)) for i in ids if not (skip_special_tokens and i == 0))


def prompts(*records):
    """A prompt batch as the processor's ``collate_prompts`` gives it (left-padded with 0)."""
    width = 1 + max(len(r["prompt"]) for r in records)
    return {
        "input_ids": torch.tensor(
            [[0] * (width - len(r["prompt"])) + [*map(ord, r["prompt"])] for r in records]
        ),
        "answer": [r["answer"] for r in records],
        "meta": [r.get("meta", {}) for r in records],
        "id": [r["id"] for r in records],
    }


def test_vqa_scores_each_question_type_and_each_split_on_its_own():
    obj = VQAObjective(["color", "count"])
    batch = prompts(
        {"id": "a", "prompt": "<image>col?", "answer": "Red", "meta": {"qtype": "color"}},
        {"id": "b", "prompt": "how many?", "answer": "two", "meta": {"qtype": "count"}},
        {"id": "c", "prompt": "shape?", "answer": "circle", "meta": {"qtype": "shape"}},
        {"id": "d", "prompt": "col?", "answer": "blue", "meta": {"qtype": "color"}},
    )
    obj.update("val", batch, ["red.", "2", "circle", "green"])  # normalised: "red", "2" match
    assert obj.compute("test") == {}  # nothing seen in test
    scores = {k: float(v) for k, v in obj.compute("val").items()}
    assert scores == {"acc": 0.75, "acc_color": 0.5, "acc_count": 1.0}  # shape: overall only
    obj.reset("val")
    assert obj.compute("val") == {}
    assert (obj.monitor, obj.progress) == ("acc", ("acc",))


def test_vqa_rows_name_the_question_and_are_made_lazily():
    obj = VQAObjective(["color"])
    batch = prompts(
        {"id": "a", "prompt": "<image>col?", "answer": "red", "meta": {"qtype": "color"}},
        {"id": "b", "prompt": "col?", "answer": "blue"},
    )
    rows = obj.rows(batch, ["red", "green"], Tokenizer())
    first = next(rows)
    assert first == {"id": "a", "qtype": "color", "prompt": "col?", "prediction": "red", "answer": "red"}
    assert list(islice(rows, 5)) == [
        {"id": "b", "qtype": "vqa", "prompt": "col?", "prediction": "green", "answer": "blue"}
    ]


def test_captions_are_scored_against_every_reference_of_an_image(monkeypatch):
    seen = {}

    def score(predictions, references):
        seen.update(predictions=predictions, references=references)
        return {"bleu4": 0.5, "cider": 1.0}

    monkeypatch.setattr("vlm.core.caption_metrics.score_captions", score)
    obj = CaptionObjective()
    batch = prompts(
        {
            "id": "i1",
            "prompt": "",
            "answer": "a red circle",
            "meta": {"captions": ["a red circle", "disc"]},
        },
        {"id": "i2", "prompt": "", "answer": "a blue square"},
    )
    obj.update("test", batch, ["a red circle", "a square"])
    assert {k: float(v) for k, v in obj.compute("test").items()} == {"bleu4": 0.5, "cider": 1.0}
    assert seen["references"] == {"i1": ["a red circle", "disc"], "i2": ["a blue square"]}
    rows = list(obj.rows(batch, ["a red circle", "a square"], Tokenizer()))
    assert rows[1] == {"id": "i2", "prediction": "a square", "references": ["a blue square"]}
    assert (obj.monitor, obj.progress) == ("cider", ("bleu4", "cider"))


def test_a_target_names_only_the_kind_of_class_its_key_is_for():
    with pytest.raises(
        ValueError,
        match="objective._target_ 'builtins.print' is not a known Objective: choose from vlm.core.objec",
    ):
        build_objective({"_target_": "builtins.print"})
    with pytest.raises(
        ValueError,
        match="family.model._target_ 'builtins.dict' is not a known VLMModel: choose from vlm.core.llava",
    ):
        build_model({"_target_": "builtins.dict"}, tokenizer=None)
    with pytest.raises(ValueError, match="family.model._target_ is missing: it names a VLMModel class"):
        build_model({"vision_tower": {}}, tokenizer=None)
    assert isinstance(
        build_objective({"_target_": "vlm.core.objectives.VQAObjective", "qtypes": ["a"]}), VQAObjective
    )

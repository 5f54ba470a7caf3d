"""``vlm-bench compare=hf``: transformers' LLaVA with our weights is checked to give our loss and
greedy tokens before both are timed; a model HF's LLaVA cannot express, or one whose HF twin
computes something else, is refused in one line."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from runs import compose_run
from torch import nn

from vlm.bench.compare_hf import NotEquivalent, Side, check_equal, check_maps
from vlm.cli.build import build_module
from vlm.core.tokenizer import train_tokenizer
from vlm.runtime.errors import ConfigError

TINY = [
    "trainer=cpu", "bench.warmup=1", "bench.steps=1", "bench.batch_size=2", "bench.text_len=24",
    "bench.generate_tokens=4", "bench.generate_repeats=1", "bench.compare_rounds=2",
]  # fmt: skip

TOKENIZER = train_tokenizer(["what colour is the shape"] * 10, vocab_size=120)


def vlm_bench(out: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "vlm.cli.bench", *TINY, *overrides, f"hydra.run.dir={out}"]
    env = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def test_compare_hf_checks_equal_loss_and_tokens_then_times_both(tmp_path):
    proc = vlm_bench(tmp_path, "compare=hf")
    assert proc.returncode == 0, proc.stderr[-4000:]
    c = json.loads((tmp_path / "bench.json").read_text())["compare_hf"]
    checked = c["checked"]
    assert checked["loss_rel_diff"] <= 1e-5 and checked["hf_loss"] == pytest.approx(checked["loss"], rel=1e-5)
    assert checked["tokens_equal_at_batch"] == [1, 2] and c["new_tokens"] == 4
    assert sorted(c["work"]) == ["generate_b1", "generate_b2", "train_step_b2"]
    for f in c["work"].values():
        assert len(f["ours_s"]) == len(f["hf_s"]) == 2
        assert f["ratio_min"] <= f["ratio"] <= f["ratio_max"] and f["ratio"] > 0
    assert "HF / ours" in proc.stdout


@pytest.mark.parametrize(
    ("overrides", "said"),
    [
        (
            ["family=calm", "family.model.calm.num_layers=2"],
            "CALM's cross-attention composition of two towers has no place in HF's LLaVA",
        ),
        (["image_positions=mrope"], "image_positions=mrope has no place in HF LLaVA; family=llava"),
        (["llm=tiny_gpt2"], "a gpt2 LLM has no place in HF LLaVA's weights"),
    ],
)
def test_a_model_hf_llava_cannot_express_is_refused_in_one_line(overrides, said, tmp_path):
    module = build_module(compose_run(["encoder=tiny_clip", *overrides], tmp_path), TOKENIZER)
    with pytest.raises(ConfigError, match=re.escape(f"compare=hf: {said}")):
        check_maps(module.model)


def fake_side(loss: float, tokens: list[int]) -> Side:
    weight = nn.Parameter(torch.tensor(1.0))
    optimizer = torch.optim.AdamW([weight])
    return Side(
        nn.Linear(1, 1), lambda: weight * loss, lambda p: torch.tensor([tokens]), optimizer, [],
        contextlib.nullcontext,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("hf", "said"),
    [
        (fake_side(2.0 * (1 + 1e-3), [5, 6]), r"HF's loss 2\.002 differs from ours 2 by 1\.00e-03 relative"),
        (fake_side(2.0, [5, 7]), r"greedy tokens differ from ours at batch 1 \(1 of 2 tokens\)"),
    ],
)
def test_different_work_is_not_timed(hf, said):
    with pytest.raises(NotEquivalent, match=said):
        check_equal(fake_side(2.0, [5, 6]), hf, {1: {}})

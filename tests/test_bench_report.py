"""``vlm-report`` on a hand-made multirun with known metrics, ``vlm-bench`` on the tiny default."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vlm.cli.report import main as report_main

HEADER = ["epoch", "step", "train/loss", "val/acc", "val/acc_color", "val/acc_shape"]
# job -> (fusion, layers, [(step, acc, acc_color, acc_shape), ...]); None: the job crashed
JOBS = {
    0: ("E_D", "18", [(4, 0.5, 0.6, 0.4), (9, 0.7, 0.8, 0.6)]),
    1: ("E_D", "3-18", [(4, 0.9, 1.0, 0.8), (9, 0.8, 0.9, 0.7)]),
    2: ("E_M", "18", [(9, 0.25, 0.5, 0.0)]),
    3: ("E_M", "3-18", None),
}


def write_job(job: Path, num: int, overrides: list, config: dict, choices: dict, evals) -> None:
    (job / ".hydra").mkdir(parents=True)
    hydra = {"hydra": {"job": {"num": num}, "runtime": {"choices": choices}}}
    for name, data in (("overrides", overrides), ("config", config), ("hydra", hydra)):
        (job / ".hydra" / f"{name}.yaml").write_text(yaml.safe_dump(data))
    if evals is None:
        return
    version = job / "csv" / "version_0"
    version.mkdir(parents=True)
    with (version / "metrics.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(HEADER)
        for step, *accs in evals:
            w.writerow([0, step, 1.5, "", "", ""])  # a training row: no val metrics
            w.writerow([0, step, "", *accs])


def make_multirun(root: Path) -> None:
    """Jobs as Hydra + Lightning's CSVLogger leave them; dirs named like override_dirname so
    only ``hydra.job.num`` gives the sweep order."""
    for num, (fusion, layers, evals) in JOBS.items():
        quoted = f"'{layers}'" if layers.isdigit() else layers  # as vlm-train passes layers=18 on
        overrides = [f"fusion={fusion}", f"layers={quoted}", "trainer.max_steps=10"]
        config = {"fusion": {"name": fusion}, "layers": {"name": layers}, "trainer": {"max_steps": 10}}
        choices = {"fusion": fusion, "layers": layers}
        write_job(root / f"fusion={fusion},layers={layers}", num, overrides, config, choices, evals)


def read_csv(path: Path) -> list[list[str]]:
    with path.open(newline="") as f:
        return list(csv.reader(f))


def test_report_final_with_pivot(tmp_path, capsys):
    make_multirun(tmp_path)
    report_main([str(tmp_path), "--rows", "fusion", "--cols", "layers"])
    assert read_csv(tmp_path / "report_val-acc.csv") == [
        ["job", "fusion", "layers", "val/acc", "val/acc_color", "val/acc_shape", "step", "status"],
        ["0", "E_D", "18", "0.7000", "0.8000", "0.6000", "9", "ok"],
        ["1", "E_D", "3-18", "0.8000", "0.9000", "0.7000", "9", "ok"],
        ["2", "E_M", "18", "0.2500", "0.5000", "0.0000", "9", "ok"],
        ["3", "E_M", "3-18", "", "", "", "", "failed"],
    ]
    assert read_csv(tmp_path / "pivot_val-acc.csv") == [
        ["fusion \\ layers", "18", "3-18"],
        ["E_D", "0.7000", "0.8000"],
        ["E_M", "0.2500", "failed"],
    ]
    assert (tmp_path / "pivot_val-acc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert printed == (tmp_path / "report_val-acc.md").read_text()
    assert "fixed overrides: trainer.max_steps=10" in printed
    assert "| 3 | E_M | 3-18 |  |  |  |  | failed |" in printed
    assert "| E_M | 0.2500 | failed |" in printed


def test_a_baseline_beside_the_sweep_is_listed_but_stays_out_of_the_pivot(tmp_path):
    make_multirun(tmp_path / "sweep")
    config = {"fusion": {"num_heads": 4}, "trainer": {"max_steps": 10}}  # no strategy: plain LLaVA
    write_job(
        tmp_path / "llava" / "0", 0, ["family=llava"], config, {"family": "llava"}, [(9, 0.6, 0.7, 0.5)]
    )
    report_main([str(tmp_path), "--rows", "fusion", "--cols", "layers"])
    rows = read_csv(tmp_path / "report_val-acc.csv")
    assert rows[0][:4] == ["job", "family", "fusion", "layers"]
    assert ["llava/0", "llava", "", "", "0.6000", "0.7000", "0.5000", "9", "ok"] in rows
    assert ["sweep/0", "", "E_D", "18", "0.7000", "0.8000", "0.6000", "9", "ok"] in rows
    assert read_csv(tmp_path / "pivot_val-acc.csv")[1:] == [
        ["E_D", "0.7000", "0.8000"],
        ["E_M", "0.2500", "failed"],
    ]


def test_report_best(tmp_path):
    make_multirun(tmp_path)
    out = tmp_path / "out"
    report_main([str(tmp_path), "--best", "--out", str(out)])
    rows = read_csv(out / "report_val-acc.csv")
    assert rows[2] == ["1", "E_D", "3-18", "0.9000", "1.0000", "0.8000", "4", "ok"]
    assert not (out / "pivot_val-acc.csv").exists()


def run_bench(out: Path, *overrides: str) -> tuple[dict, str]:
    """``vlm-bench`` on the tiny default: 1 warm-up (FLOP-counted) + 2 timed steps."""
    cmd = [
        sys.executable, "-m", "vlm.cli.bench", *overrides, f"hydra.run.dir={out}",
        "bench.warmup=1", "bench.steps=2", "bench.batch_size=2", "bench.text_len=24",
        "bench.generate_tokens=4", "bench.generate_repeats=1",
    ]  # fmt: skip
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((out / "bench.json").read_text()), proc.stdout


def test_bench_tiny_cpu(tmp_path):
    result, stdout = run_bench(tmp_path / "bench", "trainer=cpu")
    assert result["samples_per_s"] > 0 and result["tokens_per_s"] > 0
    # no padding in the synthetic batch: every sample is exactly image span + text_len tokens
    assert result["seq_len"] == result["image_tokens"] + 24
    assert result["tokens_per_s"] / result["samples_per_s"] == pytest.approx(result["seq_len"])
    assert 0 < result["target_tokens_per_batch"] < 2 * 24
    assert result["flops_per_step"] > 0 and result["tflops_per_s"] > 0
    assert result["mfu"] is None and result["peak_bf16_tflops"] is None
    assert result["peak_memory_kind"] == "cpu_peak_rss" and result["peak_memory_gib"] > 0
    assert result["generate"]["new_tokens"] == 4 and result["generate"]["ms_per_batch"] > 0
    assert result["generate"]["encode_ms_per_image"] > 0
    assert result["overrides"][0] == "trainer=cpu" and "bench.steps=2" in result["overrides"]
    assert result["versions"]["torch"] and result["device"]
    assert "tokens/s" in stdout


def test_bench_of_a_two_tower_family_feeds_each_tower_and_splits_its_parameters(tmp_path):
    result, stdout = run_bench(tmp_path / "bench", "trainer=cpu", "experiment=calm_shapes")
    params = result["parameters"]
    assert params["calm"]["trainable"] == params["calm"]["total"] > 0
    assert params["anchor"]["trainable"] == params["augmenting"]["trainable"] == 0
    assert result["generate"]["encode_ms_per_image"] > 0 and "encode images" in stdout


@pytest.mark.parametrize("cache", ["dynamic", pytest.param("static", marks=pytest.mark.slow)])
def test_bench_of_the_captioner_times_a_caption_with_either_kv_cache(cache, tmp_path):
    static = ["bench.cache_implementation=static"] if cache == "static" else []
    result, _ = run_bench(tmp_path / "bench", "trainer=cpu", "experiment=qformer_shapes", *static)
    gen = result["generate"]
    assert gen["cache_implementation"] == cache and gen["new_tokens"] == 4 and gen["ms_per_batch"] > 0
    assert result["image_tokens"] == 0  # cross-attention: the caption carries no image tokens
    params = result["parameters"]
    assert params["vision_tower"]["trainable"] == 0 and params["qformer"]["trainable"] > 0
    assert 0 < params["decoder"]["trainable"] < params["decoder"]["total"]  # phase 1: 70 % frozen


@pytest.mark.gpu
def test_bench_tiny_gpu_bf16(tmp_path):
    result, _ = run_bench(tmp_path / "bench", "trainer=gpu", "trainer.precision=bf16-mixed")
    assert result["accelerator"] == "cuda" and result["precision"] == "bf16-mixed"
    assert result["peak_memory_kind"] == "cuda_max_memory_allocated" and result["peak_memory_gib"] > 0
    assert result["flops_per_step"] > 0 and result["samples_per_s"] > 0
    if result["peak_bf16_tflops"] is not None:
        assert 0 < result["mfu"] < 1


def test_numeric_axes_are_sorted_whatever_order_the_sub_sweeps_ran_in(tmp_path):
    """A grid run as several sub-sweeps (n=8 first, then n=2 and 4) still reads 2, 4, 8."""
    for folder, num, n in (("a_n8", 0, 8), ("b_rest", 0, 2), ("b_rest", 1, 4)):
        config = {"calm": {"num_layers": n, "fusion": "gated"}}
        overrides = [f"calm.num_layers={n}", "calm.fusion=gated"]
        write_job(tmp_path / folder / str(num), num, overrides, config, {}, [(9, n / 10, 0.0, 0.0)])
    report_main([str(tmp_path), "--rows", "calm.num_layers", "--cols", "calm.fusion"])
    assert read_csv(tmp_path / "pivot_val-acc.csv") == [
        ["calm.num_layers \\ calm.fusion", "gated"],
        ["2", "0.2000"],
        ["4", "0.4000"],
        ["8", "0.8000"],
    ]

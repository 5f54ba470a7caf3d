"""``make bench-gpu`` (vlm.bench.gpu_table): the whole table at size=tiny on the CPU, the
real-size workloads composed and built on the meta device, and the GPU path's reading of the
reference scripts' output, so the first run on a lent GPU measures instead of debugging."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from vlm.bench.gpu_table import ROWS, WORKLOADS, Run, json_objects, parse, plan_runs, read_figures, row_record

ENV = os.environ | {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


@pytest.mark.slow
def test_make_bench_gpu_at_size_tiny_fills_every_row_on_the_cpu(tmp_path):
    """``make bench-gpu ARGS=size=tiny``: 7 vlm-bench runs x 2 rounds, ~3 minutes on 2 cores."""
    cmd = [sys.executable, "-m", "vlm.bench.gpu_table", "size=tiny", f"out={tmp_path}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=ENV)
    assert proc.returncode == 0, proc.stderr[-4000:]
    table = (tmp_path / "table.md").read_text()
    result = json.loads((tmp_path / "table.json").read_text())
    assert [(r["workload"], r["figure"]) for r in result["rows"]] == [(r.label, r.figure) for r in ROWS]
    for row in result["rows"]:
        assert f"| {row['workload']} | {row['figure']} |" in table
        if row["figure"] == "MFU %":  # no bf16 peak is listed for a CPU
            assert row["ours"]["values"] == [] and row["ours"]["note"].startswith("n/a")
        else:
            assert len(row["ours"]["values"]) == 2 and all(v > 0 for v in row["ours"]["values"])
        for side in ("tuned", "plain"):
            assert row[side]["values"] == []
            assert row[side]["note"] in ("not run: no CUDA", "no reference")
    assert [r["note"] for r in result["runs"] if not r["name"].startswith("reference_")] == [""] * 14


VALIDATE = """
import sys
from hydra import compose, initialize_config_dir
from vlm.cli.common import CONFIG_DIR
import vlm.cli.bench  # the bench block of the schema
from vlm.runtime.validate import validate
with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
    for line in sys.stdin:
        validate(compose("bench", overrides=line.split()), data=False)
"""


@pytest.mark.slow  # builds seven real-size models on the meta device: make test-full
def test_every_real_size_workload_composes_and_builds_offline_with_random_weights(tmp_path):
    """What a GPU run would compose: each workload at size=real, its model built on the meta
    device, no hub weights asked for."""
    plan = parse(["size=real", f"out={tmp_path}"])
    plan.cuda = True
    commands = [run.command for run in plan_runs(plan) if run.round == 1 and run.name in WORKLOADS]
    lines = [
        " ".join(a for a in c[3:] if not a.startswith("hydra.")) + f" paths.output_dir={tmp_path}"
        for c in commands
    ]
    proc = subprocess.run(
        [sys.executable, "-c", VALIDATE],
        input="\n".join(lines),
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert len(lines) == len(WORKLOADS) and all("trainer=gpu" in line for line in lines)


TUNED_OUTPUT = """\
Some warning {not json}
{"calm_bf16w_compile0_b32": {"images_per_s": 600.0, "peak_gib": 6.1}}
{"calm_bf16w_compile1_b32": {"images_per_s": 779.0, "peak_gib": 5.6}}
{"caption_gptneo125m_static_compile": {"ms_20_tokens_b1": 93.0}}
"""
PLAIN_OUTPUT = json.dumps(
    {"bf16_matmul_tflops": 782.0, "calm_step_bf16_sdpa": {"images_per_s": 422.0, "peak_gib": 8.4}}, indent=1
)


def test_json_lines_and_an_indented_dump_are_both_read():
    assert json_objects(TUNED_OUTPUT)[1] == {
        "calm_bf16w_compile1_b32": {"images_per_s": 779.0, "peak_gib": 5.6}
    }
    assert (
        json_objects("noise\n" + PLAIN_OUTPUT + "\ntrailing {")[0]["calm_step_bf16_sdpa"]["peak_gib"] == 8.4
    )


def _finished(run: Run, stdout: str | None = None, bench: dict | None = None) -> Run:
    run.folder.mkdir(parents=True)
    (run.folder / "run.log").write_text(stdout or "")
    if bench is not None:
        (run.folder / "bench.json").write_text(json.dumps(bench))
    run.rc = 0
    read_figures(run)
    return run


def test_a_gpu_round_gives_ratios_and_judges_goals(tmp_path):
    """Two rounds of the CALM row as a GPU would leave them: ours from bench.json, the
    references from their printed JSON; the best round of each side makes the ratio."""
    (tmp_path / "refs").mkdir()
    plan = parse(["size=real", "rows=calm", f"out={tmp_path / 'out'}", f"reference_dir={tmp_path / 'refs'}"])
    plan.cuda = True
    runs = plan_runs(plan)
    assert [(r.name, r.round) for r in runs] == [
        ("calm", 1), ("reference_tuned", 1), ("reference_plain_hf", 1),
        ("calm", 2), ("reference_tuned", 2), ("reference_plain_hf", 2),
    ]  # fmt: skip
    for run, images_per_s in zip(runs[::3], (1000.0, 1100.0), strict=True):
        _finished(run, bench={"device": "NVIDIA H200", "samples_per_s": images_per_s, "peak_memory_gib": 4.5})
    for run in runs[1::3]:
        _finished(run, TUNED_OUTPUT)
    _finished(runs[2], PLAIN_OUTPUT)
    runs[5].rc, runs[5].note = None, "timed out after 1800 s"
    speed, memory = (row_record(plan, runs, row) for row in plan.rows)
    assert speed["ours"].text(2) == "1,000–1,100" and speed["tuned"].text(2) == "779.0"
    assert speed["plain"].text(2) == "422.0 (1 of 2 rounds)"
    assert speed["ratio_tuned"] == f"{1100 / 779:.2f}×" and speed["met"] is True
    assert memory["ratio_tuned"] == f"{4.5 / 5.6:.2f}×" and memory["met"] is True


def test_references_that_cannot_run_say_why(tmp_path):
    missing = parse(["size=tiny", f"out={tmp_path}", f"reference_dir={tmp_path / 'nowhere'}"])
    assert missing.reference_reason("reference_tuned.py") == f"not run: no {tmp_path / 'nowhere'}"
    (tmp_path / "refs").mkdir()
    here = parse(["size=tiny", f"out={tmp_path}", f"reference_dir={tmp_path / 'refs'}"])
    here.cuda = False
    assert (
        here.reference_reason("reference_tuned.py") == f"not run: no {tmp_path / 'refs'}/reference_tuned.py"
    )
    (tmp_path / "refs" / "reference_tuned.py").write_text("")
    assert here.reference_reason("reference_tuned.py") == "not run: no CUDA"
    assert parse([]).reference_label == os.environ.get("REFERENCE_DIR", "../shared/bench")
    with pytest.raises(SystemExit, match="rows=sam"):
        parse(["rows=calm,sam"])


@pytest.mark.slow  # the size=tiny table run (slow too) covers this row as well
def test_the_segmenter_row_at_size_tiny(tmp_path):
    """vlm-bench of a family that generates no text: the step is timed, generation is left out."""
    cmd = [sys.executable, "-m", "vlm.bench.gpu_table", "size=tiny", "rows=segmentation", "rounds=1"]
    proc = subprocess.run([*cmd, f"out={tmp_path}"], capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads((tmp_path / "table.json").read_text())["rows"]
    assert [r["figure"] for r in rows] == ["samples/s", "peak GiB"] and all(r["ours"]["values"] for r in rows)
    bench = json.loads((tmp_path / "ours" / "segmentation" / "round1" / "bench.json").read_text())
    assert bench["generate"] is None and bench["target_tokens_per_batch"] == 0  # prompt=fused: masks only


def test_a_run_past_its_timeout_is_stopped(tmp_path):
    run = Run("sleeper", 1, [sys.executable, "-c", "import time; time.sleep(60)"], tmp_path / "sleeper")
    run.execute(timeout=1, root=tmp_path)
    assert run.rc is None and run.note == "timed out after 1 s" and run.seconds < 30

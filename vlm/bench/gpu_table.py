"""``make bench-gpu``: every workload of ``../shared/PERF.md`` measured in one command, ours
through ``vlm-bench`` and the plain-PyTorch references in ``../shared/bench``, each in
``rounds`` repeats, as one table of both and their ratio (``<out>/table.md``, ``table.json``).

    python -m vlm.bench.gpu_table [size=real|tiny] [rounds=2] [rows=calm,llava,...]
        [out=DIR] [reference_dir=DIR] [timeout=SECONDS] [budget=SECONDS]

Absolute figures move with the machine and the day, so a reference is only compared with ours
measured in the same command on the same device. ``size=tiny`` runs the same rows at tiny
presets with few steps: the whole pipeline checked on a CPU before a GPU is spent on it. The
table is rewritten after every run, so a command cut short still leaves what it measured.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[2]
TUNED, PLAIN, PLAIN_2 = "reference_tuned.py", "reference_plain_hf.py", "reference_plain_hf_2.py"
OPTIONS = {
    "size": "real",
    "rounds": "2",
    "rows": "",
    "out": "",
    "reference_dir": "",  # default: $REFERENCE_DIR, else ../shared/bench
    "timeout": "",
    "budget": "",
}


@dataclass(frozen=True)
class Workload:
    """One ``vlm-bench`` run: its overrides at every size, then those of one size only."""

    overrides: str
    real: str
    tiny: str

    def args(self, size: str) -> list[str]:
        return [*self.overrides.split(), *(self.real if size == "real" else self.tiny).split()]


TRAINING = "bench.generate_tokens=1 bench.generate_repeats=1"  # the step is the figure
TINY_STEPS = "bench.batch_size=2 bench.warmup=1 bench.steps=2"
STAGE_1 = "bench.batch_size=32 bench.text_len=32"  # LCS-558K captions are short
CAPTION = "experiment=qformer_coco bench.text_len=24 bench.generate_tokens=20 bench.warmup=1 bench.steps=1"
# the family's Q-Former keeps its real width at any preset: qformer_shapes' shape instead
TINY_QFORMER = (
    "family.model.qformer.width=128 family.model.qformer.depth=2 "
    "family.model.qformer.num_heads=4 family.model.qformer.num_queries=8"
)
LLAVA = "encoder=clip_vit_l14_336 llm=tinyllama_1.1b connector=mlp2x_gelu stage=finetune"
SEGMENTER = (
    "family=sam_segmentation encoder=clip_vit_b16 llm=qwen3_0.6b stage=segment prompt=fused "
    "stage.tune.llm.type=frozen bench.text_len=24"
)
WORKLOADS = {
    "calm": Workload(
        f"experiment=calm_clip_dino {TRAINING}",
        STAGE_1,
        f"{TINY_STEPS} bench.text_len=16 family.model.calm.num_layers=2",  # a tiny anchor has 2 blocks
    ),
    "llava": Workload(
        f"{LLAVA} {TRAINING}", "bench.batch_size=8 bench.text_len=512", f"{TINY_STEPS} bench.text_len=64"
    ),
    "fusion_E_D": Workload(
        f"experiment=mlvf_clip_mobilellama fusion=E_D {TRAINING}", STAGE_1, f"{TINY_STEPS} bench.text_len=16"
    ),
    "fusion_I_M": Workload(
        f"experiment=mlvf_clip_mobilellama fusion=I_M {TRAINING}", STAGE_1, f"{TINY_STEPS} bench.text_len=16"
    ),
    "caption_b1": Workload(
        f"{CAPTION} bench.batch_size=1",
        "bench.generate_repeats=10",
        f"bench.generate_repeats=2 {TINY_QFORMER}",
    ),
    "caption_batched": Workload(
        CAPTION,
        "bench.batch_size=32 bench.generate_repeats=5",
        f"bench.batch_size=4 bench.generate_repeats=1 {TINY_QFORMER}",
    ),
    "segmentation": Workload(
        f"{SEGMENTER} {TRAINING}",
        "sam=vit_b sam.pretrained=false bench.batch_size=16",
        f"sam=tiny {TINY_STEPS}",
    ),
}


@dataclass(frozen=True)
class Ref:
    """Where a reference script reports a figure: ``{key: {field: value}}`` in its output."""

    script: str
    key: str
    field: str
    scale: float = 1.0


@dataclass(frozen=True)
class Goal:
    """A row's target, judged on the best round of each side at ``size=real``."""

    text: str
    met: Callable[[float, float | None], bool | None]  # (ours, tuned reference)


def _ratio_goal(factor: float) -> Goal:
    return Goal(f"≥ {factor}× tuned", lambda ours, tuned: None if tuned is None else ours >= factor * tuned)


def _at_least(x: float, unit: str) -> Goal:
    return Goal(f"≥ {x:g}{unit}", lambda ours, _: ours >= x)


def _at_most(x: float, unit: str) -> Goal:
    return Goal(f"≤ {x:g}{unit}", lambda ours, _: ours <= x)


def _mfu(r: dict) -> float | None:
    return None if r["mfu"] is None else 100 * r["mfu"]


def _captions_per_s(r: dict) -> float:
    return 1000 * r["generate"]["batch_size"] / r["generate"]["ms_per_batch"]


@dataclass(frozen=True)
class Row:
    """One figure of one workload: how ours reads it from ``bench.json``, where the references
    report it, whether more is better, and the goal."""

    group: str
    workload: str
    label: str
    figure: str
    ours: Callable[[dict], float | None]
    higher_is_better: bool = True
    tuned: Ref | None = None
    plain: Ref | None = None
    goal: Goal | None = None
    absent: str = "not in bench.json"  # ours' cell when a run finished without the figure


CALM_LABEL = "CALM stage-1 step (CLIP-L/14 + DINOv2-L, 4 modules, TinyLlama frozen, b32)"
LLAVA_LABEL = "LLaVA finetune step (CLIP-L/14-336 + TinyLlama-1.1B, 576+512, b8)"
SEG_LABEL = "LISA-style step (CLIP-B/16 + Qwen3-0.6B frozen + SAM-B decoder, b16)"
LLAVA_PLAIN = "llava_tinyllama_clipL336_step_bf16"
SEG_PLAIN = "seg_step_separate_bf16_b16"
ROWS = (
    Row("calm", "calm", CALM_LABEL, "images/s", lambda r: r["samples_per_s"],
        tuned=Ref(TUNED, "calm_bf16w_compile1_b32", "images_per_s"),
        plain=Ref(PLAIN, "calm_step_bf16_sdpa", "images_per_s"), goal=_ratio_goal(1.3)),
    Row("calm", "calm", CALM_LABEL, "peak GiB", lambda r: r["peak_memory_gib"], higher_is_better=False,
        tuned=Ref(TUNED, "calm_bf16w_compile1_b32", "peak_gib"),
        plain=Ref(PLAIN, "calm_step_bf16_sdpa", "peak_gib"), goal=_at_most(5, " GiB")),
    Row("llava", "llava", LLAVA_LABEL, "tokens/s", lambda r: r["tokens_per_s"],
        tuned=Ref(TUNED, "llava_nockpt_compile1", "tokens_per_s"),
        plain=Ref(PLAIN, LLAVA_PLAIN, "tokens_per_s")),
    Row("llava", "llava", LLAVA_LABEL, "MFU %", _mfu,
        tuned=Ref(TUNED, "llava_nockpt_compile1", "mfu_vs_989", 100),
        plain=Ref(PLAIN, LLAVA_PLAIN, "mfu_vs_989", 100), goal=_at_least(50, " %"),
        absent="n/a: no peak TFLOP/s for this device"),
    Row("layer_fusion", "fusion_E_D", "layer_fusion E_D stage-1 step (CLIP-L/14-336 + MobileLLaMA-1.4B, b32)",
        "images/s", lambda r: r["samples_per_s"]),
    Row("layer_fusion", "fusion_I_M", "layer_fusion I_M stage-1 step (CLIP-L/14-336 + MobileLLaMA-1.4B, b32)",
        "images/s", lambda r: r["samples_per_s"]),
    Row("caption", "caption_b1", "20-token caption, batch 1 (CLIP-B/32 + Q-Former + GPT-Neo-125M)", "ms",
        lambda r: r["generate"]["ms_per_batch"], higher_is_better=False,
        tuned=Ref(TUNED, "caption_gptneo125m_static_compile", "ms_20_tokens_b1"),
        plain=Ref(PLAIN_2, "caption20_bf16", "latency_ms_b1"), goal=_at_most(25, " ms")),
    Row("caption", "caption_batched", "20-token captions, batch 32", "captions/s", _captions_per_s,
        plain=Ref(PLAIN_2, "caption20_bf16", "captions_per_s_b32"), goal=_at_least(1000, "")),
    Row("segmentation", "segmentation", SEG_LABEL, "samples/s", lambda r: r["samples_per_s"],
        plain=Ref(PLAIN_2, SEG_PLAIN, "samples_per_s")),
    Row("segmentation", "segmentation", SEG_LABEL, "peak GiB", lambda r: r["peak_memory_gib"],
        higher_is_better=False, plain=Ref(PLAIN_2, SEG_PLAIN, "peak_gib")),
)  # fmt: skip
GROUPS = tuple(dict.fromkeys(r.group for r in ROWS))


@dataclass
class Run:
    """One subprocess: ours (a workload) or a reference script, in one round."""

    name: str
    round: int
    command: list[str]
    folder: Path
    env: dict[str, str] = field(default_factory=dict)
    rc: int | None = None
    seconds: float = 0.0
    note: str = ""  # why it did not run or finish; "" when it finished with rc 0
    figures: dict[str, Any] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        return self.rc is not None or bool(self.note)

    def execute(self, timeout: float, root: Path) -> None:
        """Run in this command's process group, so whatever stops the command stops the run."""
        self.folder.mkdir(parents=True, exist_ok=True)
        log = self.folder / "run.log"
        start = time.perf_counter()
        env = os.environ | {"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"} | self.env
        with log.open("w") as f:
            proc = subprocess.Popen(
                self.command, stdout=f, stderr=subprocess.STDOUT, cwd=self.folder, env=env
            )
            try:
                self.rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                self.note = f"timed out after {timeout:.0f} s"
        self.seconds = time.perf_counter() - start
        if self.rc:
            self.note = f"failed (rc {self.rc}), see {log.relative_to(root)}"


def json_objects(text: str) -> list[dict]:
    """Every JSON object printed in ``text``: one per line or indented over several, among
    other output (warnings, progress)."""
    decoder, found, i = json.JSONDecoder(), [], text.find("{")
    while i >= 0:
        try:
            obj, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            end = i + 1
        else:
            if isinstance(obj, dict):
                found.append(obj)
        i = text.find("{", end)
    return found


def read_figures(run: Run) -> None:
    if run.name.startswith("reference_"):
        text = (run.folder / "run.log").read_text(errors="replace")
        for obj in json_objects(text):
            run.figures |= obj
    elif (run.folder / "bench.json").exists():
        run.figures = json.loads((run.folder / "bench.json").read_text())
    if not run.note and not run.figures:
        run.note = "no figures"


@dataclass
class Plan:
    """What one command measures, where, and for how long at most."""

    size: str
    rounds: int
    groups: tuple[str, ...]
    out: Path
    reference_dir: Path
    reference_label: str
    timeout: float
    budget: float | None
    cuda: bool

    @property
    def rows(self) -> list[Row]:
        return [r for r in ROWS if r.group in self.groups]

    def reference_reason(self, script: str) -> str:
        """Why a reference script cannot run here, or "" when it can."""
        if not self.reference_dir.is_dir():
            return f"not run: no {self.reference_label}"
        if not (self.reference_dir / script).is_file():
            return f"not run: no {self.reference_label}/{script}"
        return "" if self.cuda else "not run: no CUDA"


def ours_command(plan: Plan, workload: Workload, folder: Path) -> list[str]:
    device = ("trainer=gpu", "trainer.precision=bf16-mixed") if plan.cuda else ("trainer=cpu",)
    return [
        sys.executable, "-m", "vlm.cli.bench", f"size={plan.size}", *device, *workload.args(plan.size),
        f"hydra.run.dir={folder}",
    ]  # fmt: skip


def plan_runs(plan: Plan) -> list[Run]:
    """Round by round: ours for each workload, then each reference script the rows read."""
    workloads = list(dict.fromkeys(r.workload for r in plan.rows))
    scripts = list(dict.fromkeys(ref.script for r in plan.rows for ref in (r.tuned, r.plain) if ref))
    runs = []
    for k in range(1, plan.rounds + 1):
        for name in workloads:
            folder = plan.out / "ours" / name / f"round{k}"
            runs.append(Run(name, k, ours_command(plan, WORKLOADS[name], folder), folder))
        for script in scripts:
            folder = plan.out / "reference" / Path(script).stem / f"round{k}"
            command = [sys.executable, str(plan.reference_dir / script)]
            runs.append(Run(Path(script).stem, k, command, folder, env={"OUT": str(folder)}))
    return runs


def run_all(plan: Plan, runs: list[Run]) -> None:
    deadline = None if plan.budget is None else time.monotonic() + plan.budget
    for i, run in enumerate(runs):
        reason = plan.reference_reason(f"{run.name}.py") if run.name.startswith("reference_") else ""
        left = None if deadline is None else deadline - time.monotonic()
        if reason:
            run.note = reason
        elif left is not None and left < 1:
            run.note = "not run: budget spent"
        else:
            print(f"[{i + 1}/{len(runs)}] round {run.round}: {run.name}", flush=True)
            run.execute(plan.timeout if left is None else min(plan.timeout, left), plan.out)
            read_figures(run)
        write_table(plan, runs)


@dataclass
class Cell:
    """One side of one row over the rounds: the values that came back, else why none did."""

    values: list[float]
    note: str

    def best(self, higher_is_better: bool) -> float | None:
        return (max if higher_is_better else min)(self.values) if self.values else None

    def text(self, rounds: int) -> str:
        if not self.values:
            return self.note
        lo, hi = min(self.values), max(self.values)
        shown = _num(lo) if _num(lo) == _num(hi) else f"{_num(lo)}–{_num(hi)}"
        return shown if len(self.values) == rounds else f"{shown} ({len(self.values)} of {rounds} rounds)"


def _num(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.1f}" if abs(x) >= 10 else f"{x:.3g}"


def _cell(runs: list[Run], read: Callable[[dict], float | None], absent: str) -> Cell:
    values, notes = [], []
    for run in (r for r in runs if r.done):
        value = read(run.figures) if run.figures else None
        if value is None:
            notes.append(run.note or absent)
        else:
            values.append(float(value))
    return Cell(values, notes[-1] if notes else "not run yet")


def _ref_reader(ref: Ref) -> Callable[[dict], float | None]:
    def read(figures: dict) -> float | None:
        value = figures.get(ref.key)
        value = value.get(ref.field) if isinstance(value, dict) else None
        return None if value is None else ref.scale * value

    return read


def _ratio(ours: float | None, ref: float | None) -> str:
    return f"{ours / ref:.2f}×" if ours is not None and ref else "—"


def row_record(plan: Plan, runs: list[Run], row: Row) -> dict[str, Any]:
    ours = _cell([r for r in runs if r.name == row.workload], row.ours, row.absent)
    sides = {}
    for side, ref in (("tuned", row.tuned), ("plain", row.plain)):
        if ref is None:
            sides[side] = Cell([], "no reference")
        else:
            ran = [r for r in runs if r.name == Path(ref.script).stem]
            sides[side] = _cell(ran, _ref_reader(ref), f"not reported by {ref.script}")
    best = {k: c.best(row.higher_is_better) for k, c in {"ours": ours, **sides}.items()}
    met = None
    if row.goal and plan.size == "real" and best["ours"] is not None:
        met = row.goal.met(best["ours"], best["tuned"])
    return {
        "workload": row.label,
        "figure": row.figure,
        "higher_is_better": row.higher_is_better,
        "ours": ours,
        **sides,
        "ratio_tuned": _ratio(best["ours"], best["tuned"]),
        "ratio_plain": _ratio(best["ours"], best["plain"]),
        "goal": row.goal.text if row.goal else "",
        "met": met,
    }


def _goal_text(record: dict, size: str) -> str:
    if not record["goal"]:
        return ""
    if size != "real":
        return f"{record['goal']} (judged at size=real)"
    verdict = {True: "met", False: "missed", None: "not judged"}[record["met"]]
    return f"{record['goal']}: {verdict}"


def markdown(plan: Plan, runs: list[Run], records: list[dict]) -> str:
    device = next((r.figures["device"] for r in runs if "device" in r.figures), "not measured yet")
    lines = [
        f"# GPU table ({datetime.now():%Y-%m-%d %H:%M}, size={plan.size}, rounds={plan.rounds})",
        "",
        f"Device: {device}. References: {plan.reference_label}. Cells: min–max over rounds; "
        "ratios: ours ÷ reference, best round of each (more images/s, less ms or GiB).",
        "",
    ]
    if plan.size == "tiny":
        lines += [
            "size=tiny: tiny presets, small batches, few steps; the labels name the size=real workloads.",
            "",
        ]
    lines += [
        "| workload | figure | ours (vlm-bench) | tuned reference | plain HF "
        "| ours ÷ tuned | ours ÷ plain HF | goal |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for rec in records:
        cells = [
            rec["workload"],
            rec["figure"],
            *(rec[k].text(plan.rounds) for k in ("ours", "tuned", "plain")),
        ]
        cells += [rec["ratio_tuned"], rec["ratio_plain"], _goal_text(rec, plan.size)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| run | round | seconds | result |", "|---|---|---|---|"]
    for run in runs:
        seconds = f"{run.seconds:.0f}" if run.seconds else ""
        lines.append(f"| {run.name} | {run.round} | {seconds} | {run.note or 'ok'} |")
    return "\n".join(lines) + "\n"


def write_table(plan: Plan, runs: list[Run]) -> str:
    records = [row_record(plan, runs, row) for row in plan.rows]
    text = markdown(plan, runs, records)
    (plan.out / "table.md").write_text(text)
    as_json = {
        "size": plan.size,
        "rounds": plan.rounds,
        "reference_dir": str(plan.reference_dir),
        "rows": [
            rec | {k: {"values": rec[k].values, "note": rec[k].note} for k in ("ours", "tuned", "plain")}
            for rec in records
        ],
        "runs": [
            {k: getattr(r, k) for k in ("name", "round", "command", "rc", "seconds", "note")}
            | {"folder": str(r.folder)}
            for r in runs
        ],
    }
    (plan.out / "table.json").write_text(json.dumps(as_json, indent=1) + "\n")
    return text


def parse(argv: list[str]) -> Plan:
    """``key=value`` options, as ``make bench-gpu ARGS='...'`` passes them."""
    opts = dict(OPTIONS)
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or key not in opts:
            raise SystemExit(
                f"gpu_table: unknown option {arg!r}; options: {', '.join(f'{k}=' for k in OPTIONS)}"
            )
        opts[key] = value
    if opts["size"] not in ("real", "tiny"):
        raise SystemExit(f"gpu_table: size={opts['size']}: choose real or tiny")
    groups = tuple(g for g in opts["rows"].split(",") if g) or GROUPS
    if unknown := [g for g in groups if g not in GROUPS]:
        raise SystemExit(f"gpu_table: rows={','.join(unknown)}: choose from {','.join(GROUPS)}")
    stamp = f"{datetime.now():%Y-%m-%d_%H-%M-%S}"
    label = opts["reference_dir"] or os.environ.get("REFERENCE_DIR", "../shared/bench")
    reference = Path(label)
    return Plan(
        size=opts["size"],
        rounds=int(opts["rounds"]),
        groups=groups,
        out=Path(opts["out"] or REPO / "logs" / "bench_gpu" / stamp).resolve(),
        reference_dir=reference if reference.is_absolute() else (REPO / reference).resolve(),
        reference_label=label,
        timeout=float(opts["timeout"] or (1800 if opts["size"] == "real" else 300)),
        budget=float(opts["budget"]) if opts["budget"] else None,
        cuda=torch.cuda.is_available(),
    )


def main(argv: list[str] | None = None) -> Path:
    plan = parse(sys.argv[1:] if argv is None else argv)
    plan.out.mkdir(parents=True, exist_ok=True)
    runs = plan_runs(plan)
    run_all(plan, runs)
    print(write_table(plan, runs), end="")
    print(f"table: {plan.out / 'table.md'}")
    return plan.out / "table.md"


if __name__ == "__main__":
    main()

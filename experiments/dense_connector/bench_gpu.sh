#!/usr/bin/env bash
# The GPU figures of the dense_connector card, in one go on one GPU (`make bench-gpu-dense`):
# the GPU tests, the plain-HF reference LLaVA step (../shared/bench, when it is there) beside
# vlm-bench of the same workload, then vlm-bench of the seed's real-size workloads
# (TinyCLIP-ViT-40M + Llama-3.2-1B, random weights, bf16-mixed): stage 1 with each connector
# kind, stage 2 with the seed's mlp4x_gelu. Figures: $OUT/gpu_tests.log, gpu_anchors.json (the
# reference) and bench_all.json (every vlm-bench run); the runs' folders under $RUNS.
set -uo pipefail
PY=${PY:-.venv/bin/python}
OUT=${OUT:-logs/bench_gpu}
RUNS=${RUNS:-$OUT/runs}
REFERENCE=${REFERENCE:-../shared/bench/reference_plain_hf.py}
mkdir -p "$OUT" "$RUNS"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1

$PY -m pytest -m gpu -q $(grep -l "mark.gpu" tests/test_*.py) 2>&1 | tee "$OUT/gpu_tests.log" | tail -15

if [ -f "$REFERENCE" ]; then  # the matmul peak and the LLaVA step; its CALM runs are another card's
  OUT=$OUT $PY - "$REFERENCE" <<'PY'
import sys
src = open(sys.argv[1]).read()
for line in ('out["calm_step_fp32_eager"] = calm_bench("eager", torch.float32)',
             'out["calm_step_bf16_sdpa"] = calm_bench("sdpa", torch.bfloat16)'):
    src = src.replace(line, "")
exec(compile(src, sys.argv[1], "exec"))
PY
fi

bench() {  # name, overrides...
  local name=$1; shift
  $PY -m vlm.cli.bench "$@" logger=csv hydra.run.dir="$RUNS/$name" 2>&1 | grep -A14 "vlm-bench" | tail -13
}
bench llava_reference_workload size=real encoder=clip_vit_l14_336 llm=tinyllama_1.1b stage=finetune trainer=gpu
for c in linear mlp4x_gelu dense_sti dense_dci4; do
  bench "dense_stage1_$c" experiment=dense_tinyclip_llama size=real connector=$c
done
bench dense_stage2_mlp4x_gelu experiment=dense_tinyclip_llama_finetune size=real connector=mlp4x_gelu

$PY - "$RUNS" "$OUT/bench_all.json" <<'PY'
import json, pathlib, sys
runs = {p.parent.name: json.loads(p.read_text()) for p in sorted(pathlib.Path(sys.argv[1]).glob("*/bench.json"))}
pathlib.Path(sys.argv[2]).write_text(json.dumps(runs, indent=1))
print("bench runs:", ", ".join(runs))
PY

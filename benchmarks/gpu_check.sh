#!/usr/bin/env bash
# One prepared check for a GPU machine (H100/H200; torch, triton, torchvision, ninja, pytest and
# pytest-benchmark preinstalled; no network). Run from the repository root:
#     bash benchmarks/gpu_check.sh          # logs and JSON go to $OUT (default: ./gpu_check_out)
# Order: build the extension for this GPU, correctness (cuda-marked tests), CUDA benchmarks, the
# main job on cuda, then a short table. Step limits keep it under ~9 minutes; its real time on an
# H100 has not been measured yet.
set -euo pipefail

cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
START=$SECONDS
step() { echo; echo "=== [$((SECONDS - START)) s] $*"; }

step "environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c 'import torch, torchvision; print("torch", torch.__version__, "cuda", torch.version.cuda, "torchvision", torchvision.__version__, torch.cuda.get_device_name())'
"$PY" -c 'import triton; print("triton", triton.__version__)' || echo "triton: not importable"

# A failing step is recorded (and fails the script at the end) but the later steps still run:
# a GPU slot is short, and the logs say which numbers to distrust. Each step has a time limit
# (seconds, overridable) so the whole script stays inside one 10-minute device command.
FAILED=()
T_TESTS="${T_TESTS:-200}" T_BENCH="${T_BENCH:-150}" T_MAIN="${T_MAIN:-60}"

step "build the extension for this GPU only (sm_90)"
TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}" FPN_FAST_CUDA=1 \
    "$PY" -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tee "$OUT/build.log" \
    || FAILED+=("build (auto then uses Triton for CUDA tensors)")
"$PY" -c 'import fpn_fast.ops as o; print({k: v["cuda"] or "available" for k, v in o.available_backends().items()})'

step "correctness first: cuda-marked tests (limit ${T_TESTS} s)"
timeout "$T_TESTS" "$PY" -m pytest -q -p no:cacheprovider -m cuda tests 2>&1 | tee "$OUT/tests_cuda.log" \
    || FAILED+=("cuda tests")

step "CUDA benchmarks (limit ${T_BENCH} s)"
# Op level everywhere; module level float32 and bf16; memory. Rounds are set in the files for cuda.
timeout "$T_BENCH" "$PY" -m pytest -q -p no:cacheprovider benchmarks -k cuda \
    --benchmark-json "$OUT/bench.json" --benchmark-columns=median,iqr,min,max,rounds --benchmark-sort=name \
    2>&1 | tee "$OUT/bench.log" || FAILED+=("benchmarks")

step "main job on cuda (default size, limit ${T_MAIN} s each)"
timeout "$T_MAIN" "$PY" -m fpn_fast --device cuda --json "$OUT/main.json" 2>"$OUT/main.err" | tee "$OUT/main.txt" \
    || { FAILED+=("main job float32"); tail -20 "$OUT/main.err"; }
timeout "$T_MAIN" "$PY" -m fpn_fast --device cuda --dtype bfloat16 --channels-last --json "$OUT/main_bf16_cl.json" \
    2>"$OUT/main_bf16_cl.err" | tee "$OUT/main_bf16_cl.txt" \
    || { FAILED+=("main job bfloat16 channels_last"); tail -20 "$OUT/main_bf16_cl.err"; }

step "summary"
if [ -s "$OUT/bench.json" ]; then
    "$PY" benchmarks/summarize.py "$OUT/bench.json" | tee "$OUT/summary.txt" || FAILED+=("summary")
else
    echo "no $OUT/bench.json"
fi
echo
echo "done in $((SECONDS - START)) s; files in $OUT"
if [ "${#FAILED[@]}" -gt 0 ]; then
    printf 'FAILED: %s\n' "${FAILED[@]}" >&2
    echo "logs in $OUT" >&2
    exit 1
fi

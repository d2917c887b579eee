#!/usr/bin/env bash
# One prepared check for a GPU machine (H100/H200; torch, triton, torchvision, ninja, pytest and
# pytest-benchmark preinstalled; no network). Run from the repository root:
#     OUT=/some/dir bash benchmarks/gpu_check.sh      # default OUT: ./gpu_check_out
# Steps, by priority (a later step gets only what the earlier ones left of T_TOTAL):
#   1. build the extension for this GPU (sm_90)
#   2. correctness: the cuda-marked tests
#   3. float32 inference benchmarks: the optimized backbone against torchvision eager and fpn_fast,
#      and the fused lateral kernel per FPN level
#   4. the float32 backbone group with torch.compile(mode="max-autotune") of torchvision (its
#      compile can take minutes: own step and JSON, so a timeout loses none of step 3's rows)
#   5. the main job, float32, with --optimize
#   6. in what time is left: the bfloat16 backbone group, then the older CUDA suites (ops, FPN
#      neck, memory)
#   7. short tables of every JSON
# Output in $OUT: gpu_check.log (everything), bench_inference.json, bench_autotune.json,
# main_optimize.json, bench_bf16.json, bench_suites.json, summary.txt: seven files (a GPU session
# brings back at most 8).
set -uo pipefail

cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
START=$SECONDS
step() { echo; echo "=== [$((SECONDS - START)) s] $*"; }

# Step limits in seconds (overridable). T_TOTAL bounds the sum, so that the script, with its
# environment and summary steps, stays under ~9 minutes: one 10-minute device command.
T_TOTAL="${T_TOTAL:-520}"
T_BUILD="${T_BUILD:-150}" T_TESTS="${T_TESTS:-160}" T_INFER="${T_INFER:-110}" T_AUTOTUNE="${T_AUTOTUNE:-200}"
T_MAIN="${T_MAIN:-60}" T_EXTRA="${T_EXTRA:-120}"
MIN_STEP=30  # a step with less of T_TOTAL left than this is skipped, not started

# A failing step is recorded (the script exits 1 at the end) but the later steps still run: a GPU
# slot is short, and the log says which numbers to distrust. Optional steps that run out of time
# are noted, not failed (their finished rows are kept).
FAILED=()
NOTES=()

# run_step NAME LIMIT RESERVE COMMAND...: COMMAND under min(LIMIT, what is left of T_TOTAL after
# RESERVE seconds kept for later steps). SIGINT first: pytest then still writes the JSON of the
# benchmarks that finished (and the compile-time notes); SIGKILL 15 s later. OPTIONAL=1 before
# the call: running out of time is a note, not a failure.
run_step() {
    local name="$1" want="$2" reserve="$3" optional="${OPTIONAL:-0}"
    shift 3
    local left=$((T_TOTAL - (SECONDS - START) - reserve))
    local limit=$((want < left ? want : left))
    step "$name (limit ${limit} s)"
    if [ "$left" -lt "$MIN_STEP" ]; then
        echo "skipped: ${left} s left of T_TOTAL=${T_TOTAL}"
        if [ "$optional" = 1 ]; then NOTES+=("$name: skipped, out of time"); else FAILED+=("$name: skipped, out of time"); fi
        return 0
    fi
    local rc=0 pid
    timeout -s INT -k 15 "$limit" "$@" &
    pid=$!
    wait "$pid" || rc=$?
    # timeout leads its own process group: end what the step left behind (compile workers that
    # would keep the log's pipe open), and nothing else.
    kill -KILL -- "-$pid" 2>/dev/null
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        if [ "$optional" = 1 ]; then NOTES+=("$name: cut at ${limit} s"); else FAILED+=("$name: timed out after ${limit} s"); fi
    elif [ "$rc" -ne 0 ]; then
        FAILED+=("$name: exit $rc")
    fi
}

BENCH_ARGS=(-q -p no:cacheprovider --benchmark-columns=median,iqr,min,max,rounds --benchmark-sort=name)

checks() {
step "environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c 'import torch, torchvision; print("torch", torch.__version__, "cuda", torch.version.cuda, "torchvision", torchvision.__version__, torch.cuda.get_device_name())'
"$PY" -c 'import triton; print("triton", triton.__version__)' || echo "triton: not importable"

# Without it, auto uses Triton for CUDA tensors and the "extension" rows are skipped.
run_step "build the extension for this GPU only (sm_90)" "$T_BUILD" 0 \
    env TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}" FPN_FAST_CUDA=1 \
    "$PY" -m pip install -q --no-build-isolation --no-deps -e .
"$PY" -c 'import fpn_fast.ops as o; print({k: v["cuda"] or "available" for k, v in o.available_backends().items()})'

# FPN_FAST_AUTOTUNE=quick: the tests cover many shapes and dtypes, each an autotune of the fused
# lateral kernel; two configs per autotune instead of nine keep the step inside its limit. The
# benchmark steps autotune over all nine at the real shapes (and the main job checks parity).
run_step "correctness first: cuda-marked tests" "$T_TESTS" 0 \
    env FPN_FAST_AUTOTUNE=quick "$PY" -m pytest -q -p no:cacheprovider -m cuda tests

# One process for both groups: the optimized backbone's first call autotunes the Triton lateral
# kernel for the same shapes the lateral group then runs.
run_step "float32 inference benchmarks: optimized backbone (no max-autotune), fused lateral" "$T_INFER" 0 \
    "$PY" -m pytest "${BENCH_ARGS[@]}" benchmarks/test_bench_inference.py \
    -k "(test_backbone_optimized and cuda and float32 and not max-autotune) or (test_lateral_fused and cuda)" \
    --benchmark-json "$OUT/bench_inference.json"

# float32 only (the issue's target); the group repeats eager and optimized so that its ratios
# come from one run. T_MAIN stays reserved for the main job.
run_step "optimized backbone vs torchvision max-autotune, float32" "$T_AUTOTUNE" "$T_MAIN" \
    "$PY" -m pytest "${BENCH_ARGS[@]}" benchmarks/test_bench_inference.py \
    -k "test_backbone_optimized and cuda and float32 and (torchvision_eager or max-autotune or fpn_fast_optimized)" \
    --benchmark-json "$OUT/bench_autotune.json"

# Fewer runs than its GPU default (5 + 20): the backbone rows are step 3's, this checks the job.
run_step "main job on cuda, float32, --optimize" "$T_MAIN" 0 \
    "$PY" -m fpn_fast --model backbone --device cuda --optimize --warmup 3 --repeats 10 --json "$OUT/main_optimize.json"

OPTIONAL=1 run_step "bfloat16 autocast: optimized backbone (no max-autotune), in the time left" "$T_EXTRA" 0 \
    "$PY" -m pytest "${BENCH_ARGS[@]}" benchmarks/test_bench_inference.py \
    -k "test_backbone_optimized and cuda and bfloat16 and not max-autotune" \
    --benchmark-json "$OUT/bench_bf16.json"

OPTIONAL=1 run_step "older CUDA suites (ops, FPN neck, memory), in the time left" "$T_EXTRA" 0 \
    "$PY" -m pytest "${BENCH_ARGS[@]}" benchmarks -k "cuda and not test_bench_inference" \
    --benchmark-json "$OUT/bench_suites.json"

step "summary"
: > "$OUT/summary.txt"
for name in bench_inference bench_autotune bench_bf16 bench_suites; do
    if [ -s "$OUT/$name.json" ]; then
        echo "## $name" >> "$OUT/summary.txt"
        "$PY" benchmarks/summarize.py "$OUT/$name.json" >> "$OUT/summary.txt" || FAILED+=("summary of $name")
    fi
done
cat "$OUT/summary.txt"
echo
echo "done in $((SECONDS - START)) s; files in $OUT"
[ "${#NOTES[@]}" -eq 0 ] || printf 'NOTE: %s\n' "${NOTES[@]}"
if [ "${#FAILED[@]}" -gt 0 ]; then
    printf 'FAILED: %s\n' "${FAILED[@]}"
    return 1
fi
}

# Everything also goes to the log; the script's status is that of the checks.
checks 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"

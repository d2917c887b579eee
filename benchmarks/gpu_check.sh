#!/usr/bin/env bash
# One prepared check for a GPU machine (H100/H200; torch, triton, torchvision, ninja, pytest,
# pytest-xdist and pytest-benchmark preinstalled; no network). Run from the repository root:
#     OUT=/some/dir bash benchmarks/gpu_check.sh      # default OUT: ./gpu_check_out
#     GPU_CHECK_DRY=1 bash benchmarks/gpu_check.sh    # every step on CPU at tiny sizes (CI runs it)
# Steps, by priority (a later step gets only what the earlier ones left of T_TOTAL):
#   1. build the extension for this GPU (sm_90)
#   2. correctness: the cuda-marked tests, 8 workers (pytest-xdist)
#   3. first calls of the optimized backbone in fresh processes, cold and warm Triton cache
#      (benchmarks/first_call.py; targets 15 s / 3 s, second shape 1 s)
#   4. training step, fpn_fast vs torchvision: float32 and bfloat16 autocast, NCHW and
#      channels_last, with a profile of the bfloat16 steps
#   5. float32 inference: the optimized backbone (CUDA graphs) against torchvision eager, fpn_fast
#      auto, the optimized backbone without graphs and the no-Triton A/B; the fused lateral kernel
#      per FPN level
#   6. the main job, float32, with --optimize
#   7. the float32 backbone group's torch.compile rows, default mode and max-autotune (long compiles)
#   8. bfloat16 inference, in the time left
#   9. the summary: last, so that the tail of the output holds it
# Output in $OUT (8 files at most, what a GPU session brings back): gpu_check.log (everything),
# summary.txt, first_call.json, bench_training.json, bench_inference.json, main_optimize.json,
# bench_autotune.json, bench_bf16.json.
set -uo pipefail

cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
START=$SECONDS
step() { echo; echo "=== [$((SECONDS - START)) s] $*"; }

DRY="${GPU_CHECK_DRY:-0}"
if [ "$DRY" = 1 ]; then
    # The same steps on CPU at tiny sizes (FPN_FAST_BENCH_DRY: benchmarks/_bench.py), so the
    # script cannot break unseen between GPU sessions; max-autotune's CPU compile is left out.
    DEV=cpu
    WORKERS="${WORKERS:-2}"
    export FPN_FAST_BENCH_DRY=1
    FIRST_CALL_ARGS=(--dry)
    MAIN_ARGS=(--device cpu --size 64x96 --warmup 0 --repeats 1)
else
    DEV=cuda
    WORKERS="${WORKERS:-8}"
    FIRST_CALL_ARGS=(--device cuda)
    MAIN_ARGS=(--device cuda --warmup 3 --repeats 10)
fi

# Step limits in seconds (overridable). T_TOTAL bounds the sum, so that the script, with its
# environment and summary steps, stays under 9 minutes: one 10-minute device command.
T_TOTAL="${T_TOTAL:-530}"
T_BUILD="${T_BUILD:-120}" T_TESTS="${T_TESTS:-200}" T_FIRST="${T_FIRST:-120}" T_TRAIN="${T_TRAIN:-90}"
T_INFER="${T_INFER:-90}" T_MAIN="${T_MAIN:-60}" T_AUTOTUNE="${T_AUTOTUNE:-150}" T_EXTRA="${T_EXTRA:-90}"
MIN_STEP=20  # a step with less of T_TOTAL left than this is skipped, not started

# A failing step is recorded (the script exits 1 at the end) but the later steps still run: a GPU
# slot is short, and the log says which numbers to distrust. Optional steps that run out of time
# are noted, not failed (their finished rows are kept).
FAILED=()
NOTES=()
DONE=()

# run_step NAME LIMIT RESERVE COMMAND...: COMMAND under min(LIMIT, what is left of T_TOTAL after
# RESERVE seconds kept for later steps). SIGINT first: pytest then still writes the JSON of the
# benchmarks that finished; SIGKILL 15 s later. OPTIONAL=1 before the call: running out of time
# is a note, not a failure.
run_step() {
    local name="$1" want="$2" reserve="$3" optional="${OPTIONAL:-0}"
    shift 3
    local left=$((T_TOTAL - (SECONDS - START) - reserve))
    local limit=$((want < left ? want : left))
    local began=$SECONDS
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
    else
        DONE+=("$name: $((SECONDS - began)) s")
    fi
}

BENCH_ARGS=(-q -p no:cacheprovider --benchmark-columns=median,iqr,min,max,rounds --benchmark-sort=name)

checks() {
step "environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi (dry run: $DRY)"
"$PY" -c 'import torch, torchvision; print("torch", torch.__version__, "cuda", torch.version.cuda, "torchvision", torchvision.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")'
"$PY" -c 'import triton; print("triton", triton.__version__)' || echo "triton: not importable"

if [ "$DRY" = 1 ]; then
    # The venv's in-place build (make install) is what runs: the step checks it loads.
    run_step "the extension as make install built it (dry run)" "$T_BUILD" 0 \
        "$PY" -c 'import fpn_fast.ops._extension as e; r = e.unavailable_reason("cpu"); print("extension:", r or "loaded"); raise SystemExit(r is not None)'
else
    # Without it, auto uses Triton for CUDA tensors and the "extension" rows are skipped.
    run_step "build the extension for this GPU only (sm_90)" "$T_BUILD" 0 \
        env TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}" FPN_FAST_CUDA=1 \
        "$PY" -m pip install -q --no-build-isolation --no-deps -e .
fi
"$PY" -c 'import fpn_fast.ops as o; print({k: v["'"$DEV"'"] or "available" for k, v in o.available_backends().items()})'

# -rfE: the failed tests' ids in the log; the last line holds the counts (copied to the summary).
run_step "correctness first: cuda-marked tests ($WORKERS workers)" "$T_TESTS" 0 \
    bash -c "set -o pipefail; '$PY' -m pytest -q -p no:cacheprovider -rfE -n $WORKERS -m cuda tests 2>&1 | tee '$OUT/.tests.txt'"

run_step "first calls in fresh processes (cold and warm Triton cache)" "$T_FIRST" 0 \
    "$PY" benchmarks/first_call.py "${FIRST_CALL_ARGS[@]}" --json "$OUT/first_call.json"

run_step "training step: fpn_fast vs torchvision (float32, bfloat16; NCHW, channels_last)" "$T_TRAIN" 0 \
    "$PY" -m pytest "${BENCH_ARGS[@]}" benchmarks/test_bench_training.py -k "$DEV" \
    --benchmark-json "$OUT/bench_training.json"

# One process for both groups: the optimized backbone's first call compiles the Triton kernels
# the lateral group then runs.
run_step "float32 inference: optimized backbone (no max-autotune), fused lateral" "$T_INFER" "$T_MAIN" \
    "$PY" -m pytest "${BENCH_ARGS[@]}" benchmarks/test_bench_inference.py \
    -k "(test_backbone_optimized and $DEV and float32 and not max-autotune and not torchvision_compiled) or (test_lateral_fused and $DEV)" \
    --benchmark-json "$OUT/bench_inference.json"

run_step "main job, float32, --optimize" "$T_MAIN" 0 \
    "$PY" -m fpn_fast --model backbone --optimize "${MAIN_ARGS[@]}" --json "$OUT/main_optimize.json"

if [ "$DRY" = 1 ]; then
    NOTES+=("max-autotune row: not run in the dry run (its CPU compile alone takes a minute)")
else
    # The group repeats eager and optimized so that its ratios come from one run.
    OPTIONAL=1 run_step "optimized backbone vs torch.compile (default, max-autotune), float32" "$T_AUTOTUNE" 0 \
        "$PY" -m pytest "${BENCH_ARGS[@]}" benchmarks/test_bench_inference.py \
        -k "test_backbone_optimized and cuda and float32 and (torchvision_eager or max-autotune or torchvision_compiled or fpn_fast_optimized)" \
        --benchmark-json "$OUT/bench_autotune.json"
fi

if [ "$DRY" = 1 ]; then
    NOTES+=("bfloat16 inference: GPU only")
else
    OPTIONAL=1 run_step "bfloat16 autocast inference (no max-autotune), in the time left" "$T_EXTRA" 0 \
        "$PY" -m pytest "${BENCH_ARGS[@]}" benchmarks/test_bench_inference.py \
        -k "test_backbone_optimized and cuda and bfloat16 and not max-autotune and not torchvision_compiled" \
        --benchmark-json "$OUT/bench_bf16.json"
fi

step "summary"
{
    echo "gpu_check (dry run: $DRY) at $(git rev-parse --short HEAD 2>/dev/null)$(git diff --quiet 2>/dev/null || echo '+local changes'), $((SECONDS - START)) s"
    echo "## cuda tests: $(tail -n 1 "$OUT/.tests.txt" 2>/dev/null)"
    grep -E '^(FAILED|ERROR) ' "$OUT/.tests.txt" 2>/dev/null | head -20
    for name in first_call bench_training bench_inference main_optimize bench_autotune bench_bf16; do
        [ -s "$OUT/$name.json" ] || continue
        echo "## $name"
        "$PY" benchmarks/summarize.py "$OUT/$name.json" || echo "(no summary of $name)"
    done
    printf 'step: %s\n' "${DONE[@]}"
    [ "${#NOTES[@]}" -eq 0 ] || printf 'NOTE: %s\n' "${NOTES[@]}"
    [ "${#FAILED[@]}" -eq 0 ] || printf 'FAILED: %s\n' "${FAILED[@]}"
} > "$OUT/summary.txt" 2>&1
rm -f "$OUT/.tests.txt"
cat "$OUT/summary.txt"
[ "${#FAILED[@]}" -eq 0 ]
}

# Everything also goes to the log; the script's status is that of the checks.
checks 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"

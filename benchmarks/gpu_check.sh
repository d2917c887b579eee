#!/usr/bin/env bash
# One prepared check for a GPU machine (H100/H200; torch, triton, torchvision, ninja, pytest,
# pytest-xdist, pytest-benchmark and tqdm preinstalled; no network). Run from the repository root:
#     OUT=/some/dir bash benchmarks/gpu_check.sh      # default OUT: ./gpu_check_out
#     GPU_CHECK_DRY=1 bash benchmarks/gpu_check.sh    # every step on CPU at tiny sizes (CI runs it)
# A rerun in what is left of a 15-minute lease (the headline only):
#     ONLY=headline T_TOTAL=330 T_HEADLINE=225 bash benchmarks/gpu_check.sh
#
# Steps, in this order. Required steps have limits whose sum must fit T_TOTAL (checked before
# anything runs: the plan fails, not the machine time); optional steps get only what is left.
#   required 1. build the extension for this GPU (sm_90)
#   required 2. preflight: every package and backend the later steps need, one line per missing one
#   required 3. the headline (benchmarks/headline.py): ResNet50-FPN, batch 1 and 2, 3x800x1216,
#               float32 (TF32 on, off) and bfloat16 autocast; torchvision eager and channels_last,
#               torch.compile default and reduce-overhead, fpn_fast optimized with and without
#               CUDA graphs; interleaved, CUDA events, medians; routes, graphs, compile times
#   required 4. the core cuda tests: tests/inference and the lateral and epilogue op tests
#   optional 5. host time: the plan guards (Python vs the extension's host guard), a replay's host
#               time with copied and with static outputs (benchmarks/test_bench_host.py)
#   optional 6. first calls in fresh processes, cold and warm Triton cache (benchmarks/first_call.py)
#   optional 7. the other cuda tests
#   optional 8. kernel benchmarks: the fused lateral op per FPN level, the conv epilogue routes
#   optional 9. training step, fpn_fast vs torchvision
#   optional 10. the main job, float32, --optimize
#   optional 11. torch.compile max-autotune against fpn_fast optimized (long compiles): last
#   then the summary, which opens with the headline table.
# Output in $OUT (8 files at most, what a GPU session brings back), each written as its step
# runs: gpu_check.log (everything), summary.txt, headline.json, first_call.json,
# bench_kernels.json, bench_training.json, main_optimize.json, headline_autotune.json.
set -uo pipefail

cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
START=$SECONDS
step() { echo; echo "=== [$((SECONDS - START)) s] $*"; }

DRY="${GPU_CHECK_DRY:-0}"
ONLY="${ONLY:-}"   # "headline": build, preflight and the headline only (a rerun)
if [ "$DRY" = 1 ]; then
    # The same steps on CPU at tiny sizes (FPN_FAST_BENCH_DRY: benchmarks/_bench.py), so the
    # script cannot break unseen between GPU sessions; max-autotune's CPU compile is left out.
    DEV=cpu
    WORKERS="${WORKERS:-2}"
    export FPN_FAST_BENCH_DRY=1
    DRY_ARGS=(--dry)
    MAIN_ARGS=(--device cpu --size 64x96 --warmup 0 --repeats 1)
else
    DEV=cuda
    WORKERS="${WORKERS:-8}"
    DRY_ARGS=()
    MAIN_ARGS=(--device cuda --warmup 3 --repeats 10)
fi

# Step limits in seconds (overridable). T_TOTAL bounds the whole: 450 s plus the environment and
# summary steps and a machine start leave about 6 minutes of a 15-minute lease for a rerun.
T_TOTAL="${T_TOTAL:-450}"
T_BUILD="${T_BUILD:-75}" T_PREFLIGHT="${T_PREFLIGHT:-30}" T_HEADLINE="${T_HEADLINE:-240}"
T_TESTS_CORE="${T_TESTS_CORE:-90}"
T_HOST="${T_HOST:-45}" T_FIRST="${T_FIRST:-120}" T_TESTS_REST="${T_TESTS_REST:-150}" T_KERNELS="${T_KERNELS:-60}"
T_TRAIN="${T_TRAIN:-60}" T_MAIN="${T_MAIN:-45}" T_AUTOTUNE="${T_AUTOTUNE:-150}"
MIN_STEP=20  # a step with less of T_TOTAL left than this is skipped, not started
if [ "$ONLY" = headline ]; then T_TESTS_CORE=0; fi
REQUIRED=$((T_BUILD + T_PREFLIGHT + T_HEADLINE + T_TESTS_CORE))
PLAN_TOTAL=$T_TOTAL
# The dry run checks the GPU plan against T_TOTAL, then runs under a budget of its own
# (DRY_T_TOTAL), so that on a slow CPU machine every optional step is still exercised.
if [ "$DRY" = 1 ]; then T_TOTAL="${DRY_T_TOTAL:-1500}"; fi

# A failing step is recorded (the script exits 1 at the end) but the later steps still run: a GPU
# slot is short, and the log says which numbers to distrust. Optional steps that run out of time
# are noted, not failed (what they wrote so far is kept).
FAILED=()
NOTES=()
DONE=()

# run_step NAME LIMIT COMMAND...: COMMAND under min(LIMIT, what is left of T_TOTAL after the
# limits of the required steps still to come). SIGINT first: pytest then still writes the JSON of
# the benchmarks that finished; SIGKILL 15 s later. OPTIONAL=1 before the call: running out of time
# is a note, not a failure. A required step's limit is released from the reserve when it starts.
RESERVE=$REQUIRED
run_step() {
    local name="$1" want="$2" optional="${OPTIONAL:-0}"
    shift 2
    if [ "$optional" != 1 ]; then RESERVE=$((RESERVE - want)); fi
    local left=$((T_TOTAL - (SECONDS - START) - RESERVE))
    local limit=$((want < left ? want : left))
    local began=$SECONDS
    step "$name (limit ${limit} s)"
    if [ "$limit" -lt "$MIN_STEP" ]; then
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
# The tests that must run before any other: the engine's, and the kernels it runs on a GPU.
CORE_TESTS=(tests/inference tests/ops/test_triton_lateral.py)
for extra in tests/ops/test_triton_conv_epilogue.py; do [ -f "$extra" ] && CORE_TESTS+=("$extra"); done
REST_IGNORES=()
for path in "${CORE_TESTS[@]}"; do REST_IGNORES+=("--ignore=$path"); done

summary() {
    echo "gpu_check (dry run: $DRY) at $(git rev-parse --short HEAD 2>/dev/null)$(git diff --quiet 2>/dev/null || echo '+local changes'), $((SECONDS - START)) s"
    if [ -s "$OUT/headline.json" ]; then
        "$PY" benchmarks/summarize.py "$OUT/headline.json" || echo "(no summary of the headline)"
    else
        echo "## headline: not measured (see gpu_check.log)"
    fi
    for name in .tests_core .tests_rest; do
        [ -s "$OUT/$name.txt" ] || continue
        echo "## cuda tests (${name#.tests_}): $(tail -n 1 "$OUT/$name.txt")"
        grep -E '^(FAILED|ERROR) ' "$OUT/$name.txt" | head -20
    done
    if [ -s "$OUT/.bench_host.txt" ]; then
        echo "## host time (benchmarks/test_bench_host.py; times per round: plan guards 1000 checks, replay host 1 call)"
        grep -E '^(test_|Name|-- )' "$OUT/.bench_host.txt" | grep -v '^----' | head -12
    fi
    for name in headline_autotune first_call bench_kernels bench_training main_optimize; do
        [ -s "$OUT/$name.json" ] || continue
        echo "## $name"
        "$PY" benchmarks/summarize.py "$OUT/$name.json" || echo "(no summary of $name)"
    done
    printf 'step: %s\n' "${DONE[@]}"
    [ "${#NOTES[@]}" -eq 0 ] || printf 'NOTE: %s\n' "${NOTES[@]}"
    [ "${#FAILED[@]}" -eq 0 ] || printf 'FAILED: %s\n' "${FAILED[@]}"
}

checks() {
step "plan: required steps ${REQUIRED} s of T_TOTAL=${PLAN_TOTAL} s (build ${T_BUILD}, preflight ${T_PREFLIGHT}, headline ${T_HEADLINE}, core tests ${T_TESTS_CORE})"
if [ "$REQUIRED" -gt "$PLAN_TOTAL" ]; then
    echo "FAILED: the required steps' limits (${REQUIRED} s) exceed T_TOTAL=${PLAN_TOTAL} s: the plan cannot finish"
    return 1
fi
[ "$DRY" = 1 ] && echo "dry run: the steps run under DRY_T_TOTAL=${T_TOTAL} s"

step "environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi (dry run: $DRY)"
"$PY" -c 'import torch, torchvision; print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version(), "torchvision", torchvision.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")'

if [ "$DRY" = 1 ]; then
    # The venv's in-place build (make install) is what runs: the step checks it loads.
    run_step "the extension as make install built it (dry run)" "$T_BUILD" \
        "$PY" -c 'import fpn_fast.ops._extension as e; r = e.unavailable_reason("cpu"); print("extension:", r or "loaded"); raise SystemExit(r is not None)'
else
    # Without it, auto uses Triton for CUDA tensors and the "extension" rows are skipped.
    run_step "build the extension for this GPU only (sm_90)" "$T_BUILD" \
        env TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}" FPN_FAST_CUDA=1 \
        "$PY" -m pip install -q --no-build-isolation --no-deps -e .
fi

run_step "preflight: packages and backends the steps need" "$T_PREFLIGHT" \
    "$PY" benchmarks/preflight.py --device "$DEV"
# Without pytest-xdist the tests run in one process (slower), rather than not at all.
XDIST=(-n "$WORKERS")
"$PY" -c 'import xdist' 2>/dev/null || { XDIST=(); NOTES+=("pytest-xdist missing: tests ran in one process"); }

run_step "headline: optimized vs eager and torch.compile (default, reduce-overhead)" "$T_HEADLINE" \
    "$PY" benchmarks/headline.py "${DRY_ARGS[@]}" --json "$OUT/headline.json"

if [ "$ONLY" = headline ]; then
    NOTES+=("ONLY=headline: the other steps were not run")
    return 0
fi

# -rfE: the failed tests' ids in the log; the last line holds the counts (copied to the summary).
run_step "core cuda tests: ${CORE_TESTS[*]}" "$T_TESTS_CORE" \
    bash -c "set -o pipefail; '$PY' -m pytest -q -p no:cacheprovider -rfE ${XDIST[*]} -m cuda ${CORE_TESTS[*]} 2>&1 | tee '$OUT/.tests_core.txt'"

OPTIONAL=1 run_step "host time: plan guards (Python vs the host guard), a replay's host time" "$T_HOST" \
    bash -c "set -o pipefail; '$PY' -m pytest ${BENCH_ARGS[*]} benchmarks/test_bench_host.py -k '$DEV' 2>&1 | tee '$OUT/.bench_host.txt'"

OPTIONAL=1 run_step "first calls in fresh processes (cold and warm Triton cache)" "$T_FIRST" \
    "$PY" benchmarks/first_call.py "${DRY_ARGS[@]}" --device "$DEV" --json "$OUT/first_call.json"

OPTIONAL=1 run_step "the other cuda tests" "$T_TESTS_REST" \
    bash -c "set -o pipefail; '$PY' -m pytest -q -p no:cacheprovider -rfE ${XDIST[*]} -m cuda tests ${REST_IGNORES[*]} 2>&1 | tee '$OUT/.tests_rest.txt'"

KERNEL_BENCHES=(benchmarks/test_bench_inference.py)
for extra in benchmarks/test_bench_conv_epilogue.py; do [ -f "$extra" ] && KERNEL_BENCHES+=("$extra"); done
OPTIONAL=1 run_step "kernels: fused lateral per FPN level, conv epilogue routes" "$T_KERNELS" \
    "$PY" -m pytest "${BENCH_ARGS[@]}" "${KERNEL_BENCHES[@]}" -k "(test_lateral_fused or conv_epilogue) and $DEV" \
    --benchmark-json "$OUT/bench_kernels.json"

OPTIONAL=1 run_step "training step: fpn_fast vs torchvision (float32, bfloat16; NCHW, channels_last)" "$T_TRAIN" \
    "$PY" -m pytest "${BENCH_ARGS[@]}" benchmarks/test_bench_training.py -k "$DEV" \
    --benchmark-json "$OUT/bench_training.json"

OPTIONAL=1 run_step "main job, float32, --optimize" "$T_MAIN" \
    "$PY" -m fpn_fast --model backbone --optimize "${MAIN_ARGS[@]}" --json "$OUT/main_optimize.json"

if [ "$DRY" = 1 ]; then
    NOTES+=("max-autotune row: not run in the dry run (its CPU compile alone takes a minute)")
else
    OPTIONAL=1 run_step "torch.compile max-autotune vs optimized, batch 2, float32 TF32 (in the time left)" "$T_AUTOTUNE" \
        "$PY" benchmarks/headline.py --groups b2-tf32 --max-autotune \
        --variants "torchvision eager,compile max-autotune,fpn_fast optimized" --json "$OUT/headline_autotune.json"
fi
}

# Everything also goes to the log (checks runs in this shell, so the summary sees its records);
# the summary is written last, so the tail of the output holds it.
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
checks
status=$?
summary > "$OUT/summary.txt" 2>&1
rm -f "$OUT/.tests_core.txt" "$OUT/.tests_rest.txt" "$OUT/.bench_host.txt"
echo
cat "$OUT/summary.txt"
if [ "$DRY" = 1 ]; then
    # The dry run checks the plan, not only the script: the summary opens with the headline table.
    "$PY" benchmarks/summarize.py --check-headline "$OUT/summary.txt" || status=1
fi
grep -q '^FAILED: ' "$OUT/summary.txt" && status=1
exit "$status"

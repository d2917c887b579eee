"""CPU deployment peers (issue 14): ``fpn_fast.optimize_for_inference`` against what a deployment
engineer would otherwise run on CPU, the ResNet50-FPN backbone, float32, batch 1.

One pytest-benchmark group per image size, "backbone peers cpu float32 batch 1 HxW", 800x1216 and
320x320. Every row computes torchvision's backbone with the same weights: random (seeded), and
random norm statistics and affine parameters (``fpn_fast.demo.randomize_norms``), so the frozen
norms are not identities. Rows:

- ``torchvision eager``: torchvision's ``resnet_fpn_backbone("resnet50")``, the baseline;
- ``fpn_fast optimized``: ``fpn_fast.optimize_for_inference`` of fpn_fast's backbone (auto
  backend); its first call in extra_info["first_call_s"] (it compiles nothing ahead);
- ``onnxruntime``: ONNX Runtime, CPU execution provider, on torchvision's backbone exported by
  ``torch.onnx.export`` in this file's set-up (opset 17, static shape, into a temporary folder):
  the TorchScript-based exporter, or the torch.export-based one where that fails (extra_info
  ``exporter``, ``opset``, ``export_s``, ``session_s``, ``first_call_s``);
- ``openvino``: OpenVINO's CPU plugin on the same ONNX file (``INFERENCE_PRECISION_HINT`` f32,
  ``PERFORMANCE_HINT`` LATENCY), one infer request, inputs and outputs shared with numpy (no copy in
  or out: the outputs are the request's buffers, valid until its next call; extra_info
  ``compile_s``, ``first_call_s``);
- ``torchvision max-autotune freezing``: ``torch.compile(torchvision backbone, mode="max-autotune",
  dynamic=False)`` with ``torch._inductor.config.freezing = True`` (weights become constants,
  prepacked for oneDNN) set only while it compiles; the compile (first call) in
  extra_info["compile_s"] (8-20 s per size on the 2-core build machine, warm or cold inductor
  cache); extra_info["graphs_compiled"] counts the graphs dynamo compiled from the first call to
  the end of the timing (1: no recompile). On by default; ``FPN_FAST_PEERS_COMPILE=0`` (or ``-k "not max-autotune"``) leaves it out.

ONNX Runtime and OpenVINO are optional: their rows skip with a reason when the package is missing.
Everything runs under ``torch.inference_mode()`` with 2 threads per runtime (``torch.set_num_threads``,
ORT ``intra_op_num_threads``, OpenVINO ``INFERENCE_NUM_THREADS``; restored for the other files).

Parity: each row's output (a call outside the timing) against torchvision eager's, per pyramid
level, the largest |difference| over that level's largest |value|; the worst level goes to
extra_info["parity_level_rel"] (all levels in ["parity_levels"]) and to the notes after the
tables, beside the medians. A row above 1e-4 (or NaN) fails after it is timed.

``test_cpu_peers_interleaved`` then times every variant that ran once per round, in turn, each
after an untimed call of its own (5 rounds at 800x1216, 21 at 320x320), and prints a second
table of medians: there a slow spell of the shared host falls on all variants alike. The rows run one after another. On a shared machine, a busy core slows torch's 2-thread OpenMP
rows (eager, fpn_fast, compiled) far more than ONNX Runtime's and OpenVINO's thread pools: each
row records the 1-minute load average before and after its timing (extra_info["loadavg_1m"], and
in the notes); numbers taken at a load above ~2 on 2 cores do not compare runtimes.
"""
import copy
import os
import time

import numpy as np
import pytest
import torch

import fpn_fast
from fpn_fast import ops
from fpn_fast.demo import build_models, level_diffs, randomize_norms
from _bench import SUMMARY

pytest.importorskip("torchvision")  # the reference row and the exported model are torchvision's

THREADS = 2
SEED = 0
PARITY_BOUND = 1e-4
OPSET = 17
COMPILE_ENV = "FPN_FAST_PEERS_COMPILE"
LEVELS = ["0", "1", "2", "3", "pool"]
# (H, W, timed rounds after one warm-up round)
SIZES = [pytest.param((800, 1216, 3), id="800x1216"), pytest.param((320, 320, 15), id="320x320")]
VARIANTS = ["torchvision eager", "fpn_fast optimized", "onnxruntime", "openvino", "torchvision max-autotune freezing"]


def _ids(variants):
    return [v.replace(" ", "_") for v in variants]


def _compile_enabled() -> bool:
    return os.environ.get(COMPILE_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


@pytest.fixture(scope="module", autouse=True)
def two_threads():
    """2 intra-op threads for torch while this file runs; the previous setting comes back after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(previous)


_MODELS = {}
_SIZE = {}  # (h, w) -> {"images", "reference", "onnx": (path, info) | exception, ...}
_RESULTS = {}  # group -> {variant: {"median", "min", "parity", "note"}}
_FORWARDS = {}  # group -> {variant: forward}, for the interleaved comparison after the rows
_INTERLEAVED = {}  # group -> {variant: [seconds per round]}
# Rounds of the interleaved comparison (every variant once per round, in turn)
INTERLEAVED_ROUNDS = {(800, 1216): 5, (320, 320): 21}


def _models():
    """(fpn_fast backbone, torchvision backbone, optimized fpn_fast), same weights and random norms."""
    if not _MODELS:
        ours, theirs = build_models(SEED, torch.device("cpu"), torch.contiguous_format)
        randomize_norms(ours, SEED)
        theirs.load_state_dict(ours.state_dict())
        _MODELS["all"] = ours, theirs, fpn_fast.optimize_for_inference(ours)
    return _MODELS["all"]


def _size_state(h: int, w: int):
    """The size's input image (seeded) and torchvision eager's output for it (the parity reference)."""
    key = (h, w)
    if key not in _SIZE:
        _SIZE.clear()  # one size at a time: the ONNX file and the runtimes' sessions are large
        _, theirs, _ = _models()
        images = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(SEED))
        with torch.inference_mode():
            reference = {k: v.clone() for k, v in theirs(images).items()}
        _SIZE[key] = {"images": images, "reference": reference}
    return _SIZE[key]


def _onnx_file(h: int, w: int, tmp_dir):
    """torchvision's backbone exported to ONNX (opset 17, this size), once per size; raises the
    export's error on every row that needs it."""
    state = _size_state(h, w)
    if "onnx" not in state:
        try:
            state["onnx"] = _export(h, w, state["images"], tmp_dir)
        except Exception as err:  # recorded: the ORT and OpenVINO rows both fail with it
            state["onnx"] = err
    if isinstance(state["onnx"], Exception):
        raise state["onnx"]
    return state["onnx"]


def _export(h, w, images, tmp_dir):
    import onnx
    _, theirs, _ = _models()
    path = tmp_dir / f"torchvision_resnet50_fpn_{h}x{w}_opset{OPSET}.onnx"
    errors = []
    # The TorchScript-based exporter writes opset 17 directly; the torch.export-based one (torch's
    # default since 2.9) writes 18 and converts down, so it is the fallback.
    for exporter, kwargs in (("torchscript", {"dynamo": False}), ("dynamo", {"dynamo": True})):
        start = time.perf_counter()
        try:
            with torch.no_grad():
                torch.onnx.export(theirs, (images,), str(path), opset_version=OPSET, input_names=["images"],
                                  output_names=[f"level_{name}" for name in LEVELS], **kwargs)
        except Exception as err:
            errors.append(f"{exporter}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
            continue
        seconds = time.perf_counter() - start
        model = onnx.load(str(path))
        opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
        SUMMARY.append(f"peers {h}x{w}: torchvision backbone exported to ONNX by the {exporter} exporter, "
                       f"opset {opset}, in {seconds:.1f} s")
        return path, {"exporter": exporter, "opset": opset, "export_s": seconds}
    raise RuntimeError("torch.onnx.export failed with both exporters: " + "; ".join(errors))


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def _torch_row(variant, h, w, benchmark):
    """(forward, first output) of a torch row, with its set-up numbers in extra_info."""
    ours, theirs, optimized = _models()
    images = _size_state(h, w)["images"]
    if variant == "torchvision eager":
        module = theirs
    elif variant == "fpn_fast optimized":
        module = optimized
    else:  # torchvision max-autotune freezing
        import torch._inductor.config as inductor_config
        # A copy, so freezing cannot touch the eager row's parameters; dynamic=False: one static graph.
        module = torch.compile(copy.deepcopy(theirs), mode="max-autotune", dynamic=False)

    def forward():
        # A set backend, whatever FPN_FAST_BACKEND says: "auto" is what a user gets by default.
        with torch.inference_mode(), ops.use_backend("auto"):
            return module(images)

    if variant == "torchvision max-autotune freezing":
        from torch._dynamo.utils import counters
        graphs_before = counters["stats"]["unique_graphs"]
        with inductor_config.patch(freezing=True):  # only for the compile, restored on exit
            out, seconds = _timed(forward)
        benchmark.extra_info["compile_s"] = seconds
        # Replaced by "graphs_compiled" after the timing: more than 1 would mean a recompile (then
        # without freezing) in it.
        benchmark.extra_info["graphs_before"] = graphs_before
        note = f"compile (first call) {seconds:.1f} s"
    else:
        out, seconds = _timed(forward)
        benchmark.extra_info["first_call_s"] = seconds
        note = f"first call {seconds:.3f} s"
    out = {k: v.clone() for k, v in out.items()}
    return forward, out, note


def _onnx_peer(package, h, w, tmp_dir, benchmark):
    """(the peer's module, ONNX file, export info) for a peer that runs the ONNX export; skips
    with a reason when the peer or onnx is missing."""
    module = pytest.importorskip(package, reason=f"optional peer: pip install {package}")
    pytest.importorskip("onnx", reason="the ONNX export needs onnx: pip install onnx")
    path, info = _onnx_file(h, w, tmp_dir)
    benchmark.extra_info.update(info)
    return module, path, info


def _onnxruntime_row(h, w, tmp_dir, benchmark):
    ort, path, info = _onnx_peer("onnxruntime", h, w, tmp_dir, benchmark)
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    session, benchmark.extra_info["session_s"] = _timed(
        lambda: ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]))
    benchmark.extra_info["onnxruntime"] = ort.__version__
    benchmark.extra_info["providers"] = session.get_providers()
    feed = {session.get_inputs()[0].name: _size_state(h, w)["images"].numpy()}
    names = [o.name for o in session.get_outputs()]

    def forward():
        return session.run(None, feed)

    outs, seconds = _timed(forward)
    benchmark.extra_info["first_call_s"] = seconds
    out = {level: torch.from_numpy(outs[names.index(f"level_{level}")]) for level in LEVELS}
    note = (f"{info['exporter']} export opset {info['opset']} {info['export_s']:.1f} s, session "
            f"{benchmark.extra_info['session_s']:.1f} s, first call {seconds:.3f} s")
    return forward, out, note


def _openvino_row(h, w, tmp_dir, benchmark):
    ov, path, info = _onnx_peer("openvino", h, w, tmp_dir, benchmark)
    config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY",
              "INFERENCE_NUM_THREADS": THREADS}
    core = ov.Core()
    compiled, benchmark.extra_info["compile_s"] = _timed(lambda: core.compile_model(str(path), "CPU", config))
    benchmark.extra_info["openvino"] = ov.__version__
    benchmark.extra_info["config"] = {key: str(compiled.get_property(key)) for key in config}
    request = compiled.create_infer_request()
    feed = {0: _size_state(h, w)["images"].numpy()}
    names = [o.get_any_name() for o in compiled.outputs]

    def forward():
        # Zero-copy in and out: the results are the request's own buffers (until its next call).
        return request.infer(feed, share_inputs=True, share_outputs=True)

    result, seconds = _timed(forward)
    benchmark.extra_info["first_call_s"] = seconds
    out = {level: torch.from_numpy(np.array(result[names.index(f"level_{level}")], copy=True)) for level in LEVELS}
    note = (f"compile_model {benchmark.extra_info['compile_s']:.1f} s, first call {seconds:.3f} s")
    return forward, out, note


def _parity(out, reference):
    per_level = level_diffs(out, reference)
    worst = max(d["rel"] for d in per_level.values())
    if any(d["rel"] != d["rel"] for d in per_level.values()):  # NaN anywhere is a failure
        worst = float("nan")
    return worst, {level: d["rel"] for level, d in per_level.items()}


def _fmt_ms(seconds):
    return f"{seconds * 1e3:9.1f} ms"


def _notes():
    """The peers table printed after pytest-benchmark's: medians, ratios and parity side by side."""
    lines = []
    for group, rows in _RESULTS.items():
        lines.append(f"{group} ({THREADS} threads each; parity = worst level's max |diff| / its max |value|, "
                     f"bound {PARITY_BOUND:g}):")
        base = rows.get("torchvision eager", {}).get("median")
        fast = rows.get("fpn_fast optimized", {}).get("median")
        lines.append(f"  {'variant':<36} {'median':>12} {'min':>12} {'vs eager':>9} {'optimized vs it':>16} "
                     f"{'parity':>9}  set-up")
        for variant in VARIANTS:
            if variant not in rows:
                continue
            r = rows[variant]
            vs_eager = f"{base / r['median']:.2f}x" if base else ""
            vs_fast = f"{r['median'] / fast:.2f}x" if fast else ""
            lines.append(f"  {variant:<36} {_fmt_ms(r['median']):>12} {_fmt_ms(r['min']):>12} {vs_eager:>9} "
                         f"{vs_fast:>16} {r['parity']:9.1e}{'' if r['parity'] <= PARITY_BOUND else ' FAILS'}  {r['note']}")
    return lines


def _interleaved_notes():
    """The interleaved comparison: every variant called once per round, in turn, so a slow spell
    of the shared host falls on all of them alike."""
    lines = []
    for group, times in _INTERLEAVED.items():
        medians = {variant: float(np.median(t)) for variant, t in times.items()}
        fast = medians.get("fpn_fast optimized")
        rounds = len(next(iter(times.values())))
        lines.append(f"{group}, interleaved ({rounds} rounds; each variant timed once per round, in turn, "
                     f"after an untimed call of its own):")
        lines.append(f"  {'variant':<36} {'median':>12} {'min':>12} {'optimized vs it':>16}")
        for variant in VARIANTS:
            if variant in medians:
                ratio = f"{medians[variant] / fast:.2f}x" if fast else ""
                lines.append(f"  {variant:<36} {_fmt_ms(medians[variant]):>12} {_fmt_ms(min(times[variant])):>12} "
                             f"{ratio:>16}")
    return lines


SUMMARY.append(_notes)  # called when the notes are printed (conftest), after every row has run
SUMMARY.append(_interleaved_notes)


@pytest.mark.parametrize("variant", VARIANTS, ids=_ids(VARIANTS))
@pytest.mark.parametrize("size", SIZES)
def test_cpu_peers(benchmark, tmp_path_factory, size, variant):
    h, w, n_rounds = size
    if variant == "torchvision max-autotune freezing" and not _compile_enabled():
        pytest.skip(f"{COMPILE_ENV}={os.environ[COMPILE_ENV]} leaves the max-autotune + freezing compile out")
    group = f"backbone peers cpu float32 batch 1 {h}x{w}"
    benchmark.group = group
    tmp_dir = tmp_path_factory.getbasetemp()  # one folder for the session's ONNX files
    if variant == "onnxruntime":
        forward, out, note = _onnxruntime_row(h, w, tmp_dir, benchmark)
    elif variant == "openvino":
        forward, out, note = _openvino_row(h, w, tmp_dir, benchmark)
    else:
        forward, out, note = _torch_row(variant, h, w, benchmark)
    worst, per_level = _parity(out, _size_state(h, w)["reference"])
    benchmark.extra_info["threads"] = THREADS
    benchmark.extra_info["parity_level_rel"] = worst
    benchmark.extra_info["parity_levels"] = per_level
    benchmark.extra_info["parity_bound"] = PARITY_BOUND
    load_before = os.getloadavg()[0]
    benchmark.pedantic(forward, rounds=n_rounds, warmup_rounds=1, iterations=1)
    # A busy machine hurts torch's 2-thread OpenMP rows far more than ORT's and OpenVINO's pools:
    # the 1-minute load average before and after the timing, to read the row by.
    benchmark.extra_info["loadavg_1m"] = [load_before, os.getloadavg()[0]]
    stats = benchmark.stats.stats
    if "graphs_before" in benchmark.extra_info:
        from torch._dynamo.utils import counters
        benchmark.extra_info["graphs_compiled"] = (counters["stats"]["unique_graphs"]
                                                   - benchmark.extra_info.pop("graphs_before"))
    _FORWARDS.setdefault(group, {})[variant] = forward
    _RESULTS.setdefault(group, {})[variant] = {"median": stats.median, "min": stats.min, "parity": worst,
                                               "note": note + ", load %.1f-%.1f" % tuple(
                                                   benchmark.extra_info["loadavg_1m"])}
    if not worst <= PARITY_BOUND:
        pytest.fail(f"{variant} at {h}x{w}: worst level differs from torchvision eager by {worst:.3e} of its "
                    f"largest value (bound {PARITY_BOUND:g}); per level {per_level}")


@pytest.mark.parametrize("size", SIZES)
def test_cpu_peers_interleaved(benchmark, size):
    """The rows above time one variant after another; on a shared host a slow spell then lands on
    one row only. Here every variant that ran above (same models, sessions and compiled graph) is
    timed once per round, in turn (after one untimed call of its own), and the per-variant medians
    go to the notes and extra_info ("interleaved_median_s"). pytest-benchmark's own number for
    this test is a whole round."""
    h, w, _ = size
    group = f"backbone peers cpu float32 batch 1 {h}x{w}"
    forwards = _FORWARDS.get(group, {})
    if "fpn_fast optimized" not in forwards or len(forwards) < 2:
        pytest.skip(f"needs fpn_fast optimized and a peer to have run at {h}x{w} (run the whole file)")
    benchmark.group = group + " interleaved"
    times = {variant: [] for variant in VARIANTS if variant in forwards}

    def one_round():
        for variant in times:
            # An untimed call first: the previous variant's thread pool may still be spinning
            # (OpenMP's, ONNX Runtime's), which would bill one runtime for another's idle threads.
            forwards[variant]()
            start = time.perf_counter()
            forwards[variant]()
            times[variant].append(time.perf_counter() - start)

    benchmark.pedantic(one_round, rounds=INTERLEAVED_ROUNDS[(h, w)], warmup_rounds=0, iterations=1)
    _INTERLEAVED[group] = times
    benchmark.extra_info["interleaved_median_s"] = {variant: float(np.median(t)) for variant, t in times.items()}

"""The ``python -m fpn_fast`` job: build the ResNet50-FPN backbone, check every backend against the
pure-PyTorch reference and torchvision, and time the FPN neck and the whole backbone.
``--optimize`` adds ``fpn_fast.optimize_for_inference``'s model, ``--compile`` torchvision's
compiled with ``torch.compile(mode="max-autotune")``.

Everything runs in eval() under torch.inference_mode() on one generated image batch (random
weights, seeded; nothing is downloaded). Progress goes to stderr, the report to stdout.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections import OrderedDict
from contextlib import nullcontext
from typing import Callable, Dict, List, Optional

import torch

import fpn_fast
from fpn_fast import ops
from fpn_fast.ops._triton_lateral import cudnn_conv_allows_tf32

try:
    import torchvision
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone as tv_resnet_fpn_backbone
except ImportError:  # optional: its rows are skipped and the report says so
    torchvision = None

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TORCHVISION = "torchvision eager"
REFERENCE = "torch"  # the fpn_fast backend every other one is compared with
OPTIMIZED = "fpn_fast optimized"  # fpn_fast.optimize_for_inference(backbone), --optimize
COMPILED = "torchvision max-autotune"  # torch.compile(torchvision backbone, mode="max-autotune"), --compile
# The optimized model's float32 parity bound (tests/test_inference.py): every output level within
# 1e-4 of that level's largest magnitude. It does not hold for TF32 or low-precision runs.
PARITY_BOUND = 1e-4


def _size(text: str):
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be HxW, e.g. 800x1216, not {text!r}")
    if h < 32 or w < 32:
        raise argparse.ArgumentTypeError(f"size must be at least 32x32 (five stride-2 stages), not {text!r}")
    return h, w


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, not {text}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, not {text}")
    return value


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fpn-fast", description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=_positive, default=2, help="images per batch (default 2)")
    p.add_argument("--size", type=_size, default=(800, 1216), metavar="HxW", help="image size (default 800x1216)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                   help="bfloat16/float16 run under autocast (default float32)")
    p.add_argument("--channels-last", action="store_true", help="model and input in channels_last")
    p.add_argument("--backend", choices=("all",) + ops.BACKENDS, default="all",
                   help="fpn_fast backend(s) to check and time (default: all available)")
    p.add_argument("--repeats", type=_positive, default=None, help="timed runs per variant (default: cpu 3, cuda 20)")
    p.add_argument("--warmup", type=_non_negative, default=None, help="untimed runs first (default: cpu 1, cuda 5)")
    p.add_argument("--optimize", action="store_true",
                   help="also check and time fpn_fast.optimize_for_inference(backbone): norms folded, "
                        "channels_last, fused lateral convs (auto backend)")
    p.add_argument("--compile", action="store_true",
                   help='also time torch.compile(torchvision backbone and neck, mode="max-autotune"), '
                        "compiled before the timings (minutes on CPU; needs torchvision)")
    p.add_argument("--seed", type=int, default=0, help="seed of weights and images (default 0)")
    p.add_argument("--json", metavar="PATH", help="write every number to this JSON file")
    p.add_argument("--plot", metavar="PATH", help="write a PNG bar chart of the speed-ups (needs matplotlib)")
    args = p.parse_args(argv)
    try:
        args.device = torch.device(args.device)
    except RuntimeError as err:
        p.error(f"--device: {err}")
    if args.device.type not in ("cpu", "cuda"):
        p.error(f"--device must be cpu or cuda, not {args.device}")
    if args.device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU is available")
    if args.compile and torchvision is None:
        p.error("--compile compiles torchvision's backbone: torchvision is not installed")
    on_gpu = args.device.type == "cuda"
    # On CPU the default-size backbone takes ~10 s a run on 2 cores: 3 runs keep the job to minutes.
    args.repeats = args.repeats or (20 if on_gpu else 3)
    args.warmup = (5 if on_gpu else 1) if args.warmup is None else args.warmup
    return args


# ---------------------------------------------------------------------------------------------
# What can run here

def backend_reasons(device_type: str) -> Dict[str, Optional[str]]:
    """{backend: None if it runs on device_type, else why not}. The Triton interpreter is a
    correctness tool, so Triton on CPU is reported unavailable even when it is switched on."""
    reasons = {name: per_device.get(device_type, f"no {device_type} support")
               for name, per_device in ops.available_backends().items()}
    if device_type == "cpu" and reasons.get("triton") is None:
        reasons["triton"] = "on CPU Triton runs only in its interpreter (TRITON_INTERPRET=1): not timed"
    return reasons


def selected_backends(choice: str, reasons: Dict[str, Optional[str]]) -> List[str]:
    """The reference first, then the chosen available backends."""
    if choice == "all":
        chosen = [name for name in ops.BACKENDS if name != "auto" and reasons[name] is None]
    elif choice != "auto" and reasons[choice] is not None:
        raise SystemExit(f"fpn-fast: backend {choice!r} cannot run on this device: {reasons[choice]}")
    else:
        chosen = [choice]
    return [REFERENCE] + [name for name in chosen if name != REFERENCE]


def machine_info(device: torch.device) -> Dict[str, object]:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "device": str(device),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    info["versions"] = {"python": platform.python_version(), "torch": torch.__version__,
                        "torchvision": torchvision.__version__ if torchvision else None,
                        "triton": triton_version, "fpn_fast": fpn_fast.__version__,
                        "cuda": torch.version.cuda}
    return info


# ---------------------------------------------------------------------------------------------
# Measuring

def time_runs(fn: Callable[[], object], warmup: int, repeats: int, device: torch.device,
              label: str) -> Dict[str, float]:
    """Median, min, max and quartiles (seconds) of ``repeats`` runs after ``warmup`` untimed ones.
    On a GPU each run is bracketed by synchronisations, so the time is the device's."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for i in range(warmup + repeats):
        phase, k, n = ("warm-up", i + 1, warmup) if i < warmup else ("run", i + 1 - warmup, repeats)
        _progress(f"{label}: {phase} {k}/{n}")
        sync()
        start = time.perf_counter()
        fn()
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    q1, _, q3 = statistics.quantiles(times, n=4) if len(times) > 1 else times * 3
    return {"median": statistics.median(times), "min": min(times), "max": max(times),
            "q1": q1, "q3": q3, "runs": len(times)}


def max_diff(outputs: Dict[str, torch.Tensor], reference: Dict[str, torch.Tensor]) -> Dict[str, float]:
    """Largest |a - b| over all levels ("abs"), that divided by the largest |b| of all levels
    ("rel", a scale-aware relative error that stays finite where the reference is near zero), and
    the worst level's largest |a - b| divided by that level's largest |b| ("level_rel", what the
    parity bound is stated in: the coarse levels have a smaller scale than the fine ones)."""
    per_level = {k: ((outputs[k].float() - ref.float()).abs().max().item(), ref.float().abs().max().item())
                 for k, ref in reference.items()}
    abs_diff = max(diff for diff, _ in per_level.values())
    scale = max(level_scale for _, level_scale in per_level.values())
    level_rel = max(diff / level_scale if level_scale > 0 else diff for diff, level_scale in per_level.values())
    return {"abs": abs_diff, "rel": abs_diff / scale if scale > 0 else abs_diff, "level_rel": level_rel}


def parity_applies(dtype: torch.dtype, device: torch.device) -> bool:
    """The 1e-4 bound is one of IEEE float32: not of autocast runs, nor of CUDA float32 runs whose
    convolutions use TF32 (cudnn.allow_tf32, torch's default; the fused lateral kernel follows
    the same flags), where each product keeps 10 bits."""
    if dtype != torch.float32:
        return False
    return device.type != "cuda" or not cudnn_conv_allows_tf32()


def _progress(message: str, last: bool = False) -> None:
    """One line per step; on a terminal the line is rewritten in place."""
    if sys.stderr.isatty():
        print(f"\r[fpn-fast] {message}\033[K", end="\n" if last else "", file=sys.stderr, flush=True)
    else:
        print(f"[fpn-fast] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# The job

def build_models(seed: int, device: torch.device, memory_format: torch.memory_format):
    """fpn_fast's backbone (seeded random init) and torchvision's with the same weights, or None."""
    torch.manual_seed(seed)
    ours = fpn_fast.resnet50_fpn_backbone(weights=None)
    theirs = None
    if torchvision is not None:
        theirs = tv_resnet_fpn_backbone(backbone_name="resnet50", weights=None)
        theirs.load_state_dict(ours.state_dict())
    return [m.eval().to(device, memory_format=memory_format) if m is not None else None for m in (ours, theirs)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(args: argparse.Namespace) -> Dict[str, object]:
    started = time.perf_counter()
    device = args.device
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    reasons = backend_reasons(device.type)
    backends = selected_backends(args.backend, reasons)
    ours, theirs = build_models(args.seed, device, memory_format)
    generator = torch.Generator().manual_seed(args.seed)
    images = torch.randn(args.batch, 3, *args.size, generator=generator).to(device, memory_format=memory_format)
    dtype = DTYPES[args.dtype]
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext())
    failures = {}

    def attempt(label: str, fn: Callable[[], object]):
        """fn(), or None when it raises: the error is reported and the job exits 1, but the other
        variants still run."""
        try:
            return fn()
        except Exception as err:
            failures[label] = f"{type(err).__name__}: {err}"
            return None

    def with_backend(name: str, fn: Callable[[], object]) -> Callable[[], object]:
        def call():
            with ops.use_backend(name):
                return fn()
        return call

    optimized = attempt(OPTIMIZED, lambda: fpn_fast.optimize_for_inference(ours)) if args.optimize else None
    compile_s, optimized_first_call_s = None, None
    # variant label -> (whole backbone, FPN neck) callables
    with torch.inference_mode(), autocast:
        features = ours.body(images)
        variants = OrderedDict()
        if theirs is not None:
            variants[TORCHVISION] = (lambda: theirs(images), lambda: theirs.fpn(features))
        if args.compile:
            # mode="max-autotune": autotuned kernel templates and, on CUDA, CUDA graphs; dynamic=False:
            # one static graph for this size. Compiled by a first call each, here, outside the
            # timings; CUDA graph recording falls in the timing warm-up.
            compiled = OrderedDict((("backbone", (torch.compile(theirs, mode="max-autotune", dynamic=False), images)),
                                    ("neck", (torch.compile(theirs.fpn, mode="max-autotune", dynamic=False),
                                              features))))
            compile_s = OrderedDict()
            for part, (module, inputs) in compiled.items():
                _progress(f"compiling the torchvision {part} (max-autotune)")
                start = time.perf_counter()
                if attempt(COMPILED, lambda: module(inputs)) is None:
                    break
                _sync(device)
                compile_s[part] = time.perf_counter() - start
            else:
                backbone_c, neck_c = compiled["backbone"][0], compiled["neck"][0]
                variants[COMPILED] = (lambda: backbone_c(images), lambda: neck_c(features))
        for name in backends:
            variants[f"fpn_fast {name}"] = (with_backend(name, lambda: ours(images)),
                                            with_backend(name, lambda: ours.fpn(features)))
        if optimized is not None:
            # Its FPN takes the channels_last maps of its own (norm-folded) body.
            optimized_features = attempt(OPTIMIZED, with_backend(
                "auto", lambda: optimized.body(images.contiguous(memory_format=torch.channels_last))))
            if optimized_features is not None:
                variants[OPTIMIZED] = (with_backend("auto", lambda: optimized(images)),
                                       with_backend("auto", lambda: optimized.fpn(optimized_features)))

        _progress("checking outputs")
        outputs = {}
        for label, (whole, _) in list(variants.items()):
            start = time.perf_counter()
            out = attempt(label, whole)
            if out is None:
                del variants[label]
                continue
            _sync(device)
            if label == OPTIMIZED:  # on CUDA: the Triton lateral kernel's compile and autotuning
                optimized_first_call_s = time.perf_counter() - start
            # Copies: the next call of a CUDA-graphed (max-autotune) model overwrites its outputs.
            outputs[label] = OrderedDict((k, v.clone()) for k, v in out.items())
        reference, tv_out = outputs.get(f"fpn_fast {REFERENCE}"), outputs.get(TORCHVISION)
        # report row -> variant label
        diff_rows = OrderedDict((name, f"fpn_fast {name}") for name in backends)
        diff_rows.update((("optimized", OPTIMIZED), ("max-autotune", COMPILED)))
        diffs = OrderedDict(
            (row, {"vs_reference": max_diff(outputs[label], reference) if reference else None,
                   "vs_torchvision": max_diff(outputs[label], tv_out) if tv_out else None})
            for row, label in diff_rows.items() if label in outputs)
        pyramid = OrderedDict((level, list(t.shape)) for level, t in next(iter(outputs.values()), {}).items())
        del outputs, reference, tv_out

        parity = None
        if "optimized" in diffs:
            applies = parity_applies(dtype, device)
            within = OrderedDict((against, d["level_rel"] <= PARITY_BOUND)
                                 for against, d in diffs["optimized"].items() if d is not None)
            parity = {"bound": PARITY_BOUND, "applies": applies, "within": within}
            if applies and not all(within.values()):
                failures[OPTIMIZED] = (f"outside the float32 parity bound ({PARITY_BOUND:g} of each level's largest "
                                       f"value): {dict(within)}")

        timings = OrderedDict()
        for part, index in (("neck", 1), ("backbone", 0)):
            timings[part] = OrderedDict(
                (label, time_runs(fns[index], args.warmup, args.repeats, device, f"timing {part}, {label}"))
                for label, fns in variants.items())
    _progress(f"done in {time.perf_counter() - started:.0f} s", last=True)

    def ratios(against: Optional[str]):
        return {part: {label: rows[against]["median"] / row["median"] if against else None
                       for label, row in rows.items()} for part, rows in timings.items()}

    baseline = next((label for label in (TORCHVISION, f"fpn_fast {REFERENCE}") if label in variants), None)
    return {
        "machine": machine_info(device),
        "config": {"batch": args.batch, "size": list(args.size), "dtype": args.dtype,
                   "channels_last": args.channels_last, "backend": args.backend,
                   "optimize": args.optimize, "compile": args.compile,
                   "warmup": args.warmup, "repeats": args.repeats, "seed": args.seed},
        "backends": {name: {"available": reason is None, "reason": reason} for name, reason in reasons.items()},
        "torchvision": torchvision is not None,
        "pyramid": pyramid,
        "diffs": diffs,
        "parity": parity,
        "failures": failures,
        "compile_s": compile_s,
        "optimized_first_call_s": optimized_first_call_s,
        "timings": timings,
        "speedup_baseline": baseline,
        "speedups": ratios(baseline),
        "speedups_vs_compiled": ratios(COMPILED) if COMPILED in variants else None,
        "runtime_s": time.perf_counter() - started,
    }


# ---------------------------------------------------------------------------------------------
# Reporting

def print_report(result: Dict[str, object], out=None) -> None:
    def say(line: str = "") -> None:
        print(line, file=out or sys.stdout)  # looked up per call: sys.stdout may be replaced after import

    m, c = result["machine"], result["config"]
    v = m["versions"]
    say(f"fpn_fast {v['fpn_fast']}  torch {v['torch']}  torchvision {v['torchvision'] or '(not installed)'}  "
        f"triton {v['triton'] or '(not installed)'}")
    say(f"device {m['device']} ({m['gpu'] or m['cpu']}, {m['torch_threads']} threads)  batch {c['batch']}  "
        f"image {c['size'][0]}x{c['size'][1]}  {c['dtype']}{'  channels_last' if c['channels_last'] else ''}")

    say("\nBackends")
    for name, b in result["backends"].items():
        say(f"  {name:<10} {'available' if b['available'] else 'unavailable: ' + b['reason']}")

    say("\nPyramid")
    for level, shape in result["pyramid"].items():
        say(f"  {level:<5} {' x '.join(map(str, shape))}")

    say("\nLargest difference of the backbone output (abs, and abs / max|reference|)")
    say(f"  {'variant':<12} {'vs torch reference':>24} {'vs torchvision':>24}")
    for name, d in result["diffs"].items():
        cells = [f"{x['abs']:.2e} ({x['rel']:.1e} rel)" if x else "n/a"
                 for x in (d["vs_reference"], d["vs_torchvision"])]
        say(f"  {name:<12} {cells[0]:>24} {cells[1]:>24}")
    parity = result["parity"]
    if parity:
        checks = ", ".join(f"{against.replace('_', ' ')} {'yes' if ok else 'NO'} "
                           f"({result['diffs']['optimized'][against]['level_rel']:.1e})"
                           for against, ok in parity["within"].items())
        say(f"  optimized within {parity['bound']:g} of each level's largest value (worst level): {checks}")
        if not parity["applies"]:
            say("    (that bound is one of IEEE float32; this run has low precision or TF32 convolutions)")
    if not result["torchvision"]:
        say("  torchvision is not installed: no comparison with it, and no torchvision timings")
    for label, error in result["failures"].items():
        say(f"  FAILED {label}: {error}")

    setup = []
    if result["compile_s"]:
        setup.append(f"{COMPILED}: compile (first call) " + ", ".join(
            f"{part} {seconds:.1f} s" for part, seconds in result["compile_s"].items()) + ", outside the timings")
    if result["optimized_first_call_s"] is not None:
        on_gpu = m["device"].startswith("cuda")
        setup.append(f"{OPTIMIZED}: first call {result['optimized_first_call_s']:.2f} s, nothing compiled ahead"
                     + (" (it compiles and autotunes the Triton lateral kernel)" if on_gpu else ""))
    if setup:
        say()
        for line in setup:
            say(line)

    vs_compiled = result["speedups_vs_compiled"]
    say(f"\nTimings, ms: median [min - max] of {c['repeats']} runs after {c['warmup']} warm-up; "
        f"speed-up = {result['speedup_baseline']} median / median")
    header = f"  {'part':<9} {'variant':<24} {'median':>10} {'min - max':>21} {'speed-up':>9}"
    say(header + (f" {'vs max-autotune':>15}" if vs_compiled else ""))
    for part, rows in result["timings"].items():
        for label, t in rows.items():
            spread = f"{t['min'] * 1e3:.1f} - {t['max'] * 1e3:.1f}"
            speedup = result["speedups"][part][label]
            line = (f"  {part:<9} {label:<24} {t['median'] * 1e3:>10.1f} {spread:>21} "
                    f"{f'{speedup:.2f}x' if speedup else 'n/a':>9}")
            say(line + (f" {vs_compiled[part][label]:>14.2f}x" if vs_compiled else ""))
    say(f"\nruntime {result['runtime_s']:.1f} s")


def write_plot(result: Dict[str, object], path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("fpn-fast: --plot needs matplotlib (pip install matplotlib); the report was printed")
    parts = list(result["speedups"])
    labels = list(result["speedups"][parts[0]])
    width = 0.8 / len(labels)
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, label in enumerate(labels):
        xs = [p + (i - (len(labels) - 1) / 2) * width for p in range(len(parts))]
        bars = ax.bar(xs, [result["speedups"][part][label] for part in parts], width, label=label)
        ax.bar_label(bars, fmt="%.2fx", fontsize=8)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xticks(range(len(parts)), parts)
    ax.set_ylabel(f"speed-up vs {result['speedup_baseline']}")
    c, m = result["config"], result["machine"]
    ax.set_title(f"ResNet50-FPN, batch {c['batch']}, {c['size'][0]}x{c['size'][1]}, {c['dtype']}, "
                 f"{m['gpu'] or m['device']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    result = run(args)
    print_report(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}")
    if args.plot and result["speedup_baseline"]:
        write_plot(result, args.plot)
        print(f"wrote {args.plot}")
    elif args.plot:
        print("no plot written: no baseline variant ran", file=sys.stderr)
    return 1 if result["failures"] else 0

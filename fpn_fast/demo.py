"""The ``python -m fpn_fast`` job: build the ResNet50-FPN backbone, check every backend against the
pure-PyTorch reference and torchvision, and time the FPN neck and the whole backbone.

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

try:
    import torchvision
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone as tv_resnet_fpn_backbone
except ImportError:  # optional: its rows are skipped and the report says so
    torchvision = None

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TORCHVISION = "torchvision eager"
REFERENCE = "torch"  # the fpn_fast backend every other one is compared with


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
    """Largest |a - b| over all levels, and that divided by the largest |b| (a scale-aware
    relative error that stays finite where the reference is near zero)."""
    abs_diff = max((outputs[k].float() - reference[k].float()).abs().max().item() for k in reference)
    scale = max(reference[k].float().abs().max().item() for k in reference)
    return {"abs": abs_diff, "rel": abs_diff / scale if scale > 0 else abs_diff}


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

    def with_backend(name: str, fn: Callable[[], object]) -> Callable[[], object]:
        def call():
            with ops.use_backend(name):
                return fn()
        return call

    # variant label -> (whole backbone, FPN neck) callables
    with torch.inference_mode(), autocast:
        features = ours.body(images)
        variants = OrderedDict()
        if theirs is not None:
            variants[TORCHVISION] = (lambda: theirs(images), lambda: theirs.fpn(features))
        for name in backends:
            variants[f"fpn_fast {name}"] = (with_backend(name, lambda: ours(images)),
                                            with_backend(name, lambda: ours.fpn(features)))

        _progress("checking outputs")
        outputs, failures = {}, {}
        for label, (whole, _) in list(variants.items()):
            try:
                outputs[label] = whole()
            except Exception as err:  # reported, and the job exits 1, but the other variants still run
                failures[label] = f"{type(err).__name__}: {err}"
                del variants[label]
        reference, tv_out = outputs.get(f"fpn_fast {REFERENCE}"), outputs.get(TORCHVISION)
        diffs = OrderedDict(
            (name, {"vs_reference": max_diff(outputs[f"fpn_fast {name}"], reference) if reference else None,
                    "vs_torchvision": max_diff(outputs[f"fpn_fast {name}"], tv_out) if tv_out else None})
            for name in backends if f"fpn_fast {name}" in outputs)
        pyramid = OrderedDict((level, list(t.shape)) for level, t in next(iter(outputs.values()), {}).items())
        del outputs, reference, tv_out

        timings = OrderedDict()
        for part, index in (("neck", 1), ("backbone", 0)):
            timings[part] = OrderedDict(
                (label, time_runs(fns[index], args.warmup, args.repeats, device, f"timing {part}, {label}"))
                for label, fns in variants.items())
    _progress(f"done in {time.perf_counter() - started:.0f} s", last=True)

    baseline = next((label for label in (TORCHVISION, f"fpn_fast {REFERENCE}") if label in variants), None)
    speedups = {part: {label: rows[baseline]["median"] / row["median"] if baseline else None
                       for label, row in rows.items()} for part, rows in timings.items()}
    return {
        "machine": machine_info(device),
        "config": {"batch": args.batch, "size": list(args.size), "dtype": args.dtype,
                   "channels_last": args.channels_last, "backend": args.backend,
                   "warmup": args.warmup, "repeats": args.repeats, "seed": args.seed},
        "backends": {name: {"available": reason is None, "reason": reason} for name, reason in reasons.items()},
        "torchvision": torchvision is not None,
        "pyramid": pyramid,
        "diffs": diffs,
        "failures": failures,
        "timings": timings,
        "speedup_baseline": baseline,
        "speedups": speedups,
        "runtime_s": time.perf_counter() - started,
    }


# ---------------------------------------------------------------------------------------------
# Reporting

def print_report(result: Dict[str, object], out=sys.stdout) -> None:
    def say(line: str = "") -> None:
        print(line, file=out)

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
    say(f"  {'backend':<10} {'vs torch reference':>24} {'vs torchvision':>24}")
    for name, d in result["diffs"].items():
        cells = [f"{x['abs']:.2e} ({x['rel']:.1e} rel)" if x else "n/a"
                 for x in (d["vs_reference"], d["vs_torchvision"])]
        say(f"  {name:<10} {cells[0]:>24} {cells[1]:>24}")
    if not result["torchvision"]:
        say("  torchvision is not installed: no comparison with it, and no torchvision timings")
    for label, error in result["failures"].items():
        say(f"  FAILED {label}: {error}")

    say(f"\nTimings, ms: median [min - max] of {c['repeats']} runs after {c['warmup']} warm-up; "
        f"speed-up = {result['speedup_baseline']} median / median")
    say(f"  {'part':<9} {'variant':<20} {'median':>10} {'min - max':>21} {'speed-up':>9}")
    for part, rows in result["timings"].items():
        for label, t in rows.items():
            spread = f"{t['min'] * 1e3:.1f} - {t['max'] * 1e3:.1f}"
            speedup = result["speedups"][part][label]
            say(f"  {part:<9} {label:<20} {t['median'] * 1e3:>10.1f} {spread:>21} "
                f"{f'{speedup:.2f}x' if speedup else 'n/a':>9}")
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

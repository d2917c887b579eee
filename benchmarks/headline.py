"""The headline: is the optimized ResNet50-FPN backbone faster than torch.compile with CUDA graphs?

One process, one model set, groups measured one after the other (most important first) and the
JSON rewritten after each group, so a cut run keeps every finished group. A group is one batch
size and precision at 3x800x1216:

- ``b2-tf32`` / ``b1-tf32``: float32, TF32 on (cuDNN and matmul: PyTorch's default for
  convolutions);
- ``b2-bf16`` / ``b1-bf16``: bfloat16 autocast, float32 weights;
- ``b2-fp32`` / ``b1-fp32``: float32, TF32 off (exact float32 arithmetic).

Rows (variants), all from the same weights, under ``torch.inference_mode()``, the input a
contiguous float32 batch as a detector passes it:

- ``torchvision eager``: torchvision's ``resnet_fpn_backbone`` (NCHW);
- ``torchvision channels_last``: the same model in channels_last (the input converted inside the
  call, as a user would);
- ``compile default``: ``torch.compile(torchvision backbone, dynamic=False)``;
- ``compile reduce-overhead``: the same with ``mode="reduce-overhead"`` (inductor's CUDA graphs),
  ``torch.compiler.cudagraph_mark_step_begin()`` before each call;
- ``compile max-autotune``: only with ``--max-autotune`` (minutes of compile; the GPU check runs it
  last, in the time left);
- ``fpn_fast optimized``: ``fpn_fast.optimize_for_inference`` (its engine replays a CUDA graph per
  signature);
- ``optimized no-graphs``: the same, ``cuda_graphs=False`` (the A/B of the graphs).

Timing: each variant is called until compiled/planned (the time of those calls is recorded as
``compile_s`` / ``first_call_s``), warmed up, then the variants are timed interleaved (round r
times every variant once, in an order rotated each round) with CUDA events around each call;
medians. ``host_us``: the wall time of a call without waiting for the GPU (what the host spends
before the work is queued), median. ``best_peer``: the fastest torch.compile row of the group;
``vs_best_peer`` and ``vs_eager`` are ratios of medians (> 1: fpn_fast optimized is faster).

Also recorded per group: each level's largest error of ``fpn_fast optimized`` against torchvision
eager, relative to that level's largest value; the optimized backbone's plans (signature, graph
captured or why not, graph bytes); and its route report (``InferenceBackboneWithFPN.route_report``: per
layer, the route each plan chose and why the others lost or were refused), as counts per op and
route and as text.

    python benchmarks/headline.py --json headline.json                # on a GPU
    python benchmarks/headline.py --dry --json headline.json          # CPU, tiny, torch.compile's
                                                                      # "eager" backend (CI)
"""
import argparse
import contextlib
import copy
import json
import os
import statistics
import sys
import time
import traceback

import torch

import fpn_fast
from fpn_fast.demo import build_models
from fpn_fast.inference.plan import signature

GROUPS = {  # name: (batch, dtype or None for float32, TF32)
    "b2-tf32": (2, None, True), "b2-bf16": (2, torch.bfloat16, False), "b1-tf32": (1, None, True),
    "b1-bf16": (1, torch.bfloat16, False), "b2-fp32": (2, None, False), "b1-fp32": (1, None, False),
}
DEFAULT_GROUPS = list(GROUPS)
DRY_GROUPS = ["b1-fp32", "b1-bf16"]
VARIANTS = ["torchvision eager", "torchvision channels_last", "compile default", "compile reduce-overhead",
            "fpn_fast optimized", "optimized no-graphs"]
COMPILED = ("compile default", "compile reduce-overhead", "compile max-autotune")
OURS = "fpn_fast optimized"


def _set_tf32(enabled: bool) -> None:
    torch.backends.cudnn.allow_tf32 = enabled
    torch.backends.cuda.matmul.allow_tf32 = enabled


class _Timer:
    """Device time of one call: CUDA events on the current stream, or the wall clock on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def __call__(self, fn) -> tuple:
        """(device seconds, host seconds until fn returned)."""
        if self.cuda:
            torch.cuda.synchronize()
            begin = time.perf_counter()
            self.start.record()
            fn()
            host = time.perf_counter() - begin
            self.end.record()
            self.end.synchronize()
            return self.start.elapsed_time(self.end) / 1e3, host
        begin = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - begin
        return elapsed, elapsed


def _relative_errors(ours: dict, reference: dict) -> dict:
    """Per level: max |ours - reference| / max |reference| (float32), NaN-aware (a differing NaN
    mask is reported as inf)."""
    errors = {}
    for name, ref in reference.items():
        out, ref = ours[name].float(), ref.float()
        if not torch.equal(torch.isnan(out), torch.isnan(ref)):
            errors[name] = float("inf")
            continue
        finite = torch.isfinite(ref)
        scale = ref[finite].abs().max().item() if bool(finite.any()) else 1.0
        errors[name] = (out - ref)[finite].abs().max().item() / max(scale, 1e-30) if bool(finite.any()) else 0.0
    return errors


def _variants(names, theirs, optimized, no_graphs, device, dry):
    """{variant: (module, per-call wrapper)}; compiled modules are made (not yet compiled) here."""
    torch._dynamo.reset()  # a fresh cache per group: no recompile limit, no stale graphs
    channels_last = copy.deepcopy(theirs).to(memory_format=torch.channels_last)
    made = {}
    for name in names:
        if name == "torchvision eager":
            made[name] = theirs, None
        elif name == "torchvision channels_last":
            made[name] = channels_last, (lambda x: x.contiguous(memory_format=torch.channels_last))
        elif name in COMPILED:
            mode = name.split()[1]
            # The dry run (CPU, CI) traces with dynamo's "eager" backend: the step is exercised,
            # inductor's CPU compile (minutes on a 2-core machine) is not.
            options = dict(backend="eager") if dry else dict(mode=None if mode == "default" else mode)
            made[name] = torch.compile(theirs, dynamic=False, **options), None
        elif name == OURS:
            made[name] = optimized, None
        elif name == "optimized no-graphs":
            made[name] = no_graphs, None
    return made


def _call(name, module, prepare, images):
    if name == "compile reduce-overhead" or name == "compile max-autotune":
        torch.compiler.cudagraph_mark_step_begin()
    return module(prepare(images) if prepare else images)


def _routes(optimized, key) -> dict:
    """The optimized backbone's routes for the signatures planned in this group: text (as
    ``fpn_fast.inference.format_routes`` writes it: per op step, the route chosen and why each
    other candidate lost or was refused) and, per op and route, how many steps took it."""
    from fpn_fast.inference import format_routes
    rows = [row for row in optimized.route_report() if key(row["signature"])]
    counts = {}
    for row in rows:
        name = f"{row['op']}: {row['route']}" + (f" via {row['via']}" if row.get("via") else "")
        counts[name] = counts.get(name, 0) + 1
    return dict(counts=counts, text=format_routes(rows))


def run_group(group: str, models, device: torch.device, args) -> dict:
    batch, dtype, tf32 = GROUPS[group]
    theirs, optimized, no_graphs = models
    _set_tf32(tf32)
    h, w = args.size
    images = torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(0)).to(device)
    names = VARIANTS + (["compile max-autotune"] if args.max_autotune else [])
    names = [name for name in names if name in args.variants]
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext())
    timer = _Timer(device)
    result = dict(group=group, batch=batch, size=[h, w], dtype=str(dtype or torch.float32), tf32=tf32, rows={},
                  errors={})
    made = _variants(names, theirs, optimized, no_graphs, device, args.dry)
    outputs = {}
    with torch.inference_mode(), autocast:
        for name in list(made):
            module, prepare = made[name]
            row = result["rows"][name] = {}
            try:
                # First calls: compile (and record graphs), or plan (and capture), then warm-up.
                first, _ = timer(lambda: _call(name, module, prepare, images))
                second, _ = timer(lambda: _call(name, module, prepare, images))
                row["compile_s" if name in COMPILED else "first_call_s"] = first
                row["second_call_s"] = second
                for _ in range(args.warmup):
                    _call(name, module, prepare, images)
                if name in ("torchvision eager", OURS):
                    outputs[name] = {k: v.clone() for k, v in _call(name, module, prepare, images).items()}
            except Exception as error:  # a row that cannot run is recorded, the others still run
                result["errors"][name] = f"{type(error).__name__}: {error}"
                traceback.print_exc()
                del made[name]
        planned = signature(images)  # the optimized backbone's plan key for this group's calls
        device_times = {name: [] for name in made}
        host_times = {name: [] for name in made}
        order = list(made)
        for r in range(args.rounds):
            shift = r % len(order)
            for name in order[shift:] + order[:shift]:
                module, prepare = made[name]
                seconds, host = timer(lambda: _call(name, module, prepare, images))
                device_times[name].append(seconds)
                host_times[name].append(host)
    for name in made:
        result["rows"][name].update(median_ms=statistics.median(device_times[name]) * 1e3,
                                    min_ms=min(device_times[name]) * 1e3,
                                    host_us=statistics.median(host_times[name]) * 1e6,
                                    rounds=len(device_times[name]))
    medians = {name: row["median_ms"] for name, row in result["rows"].items() if "median_ms" in row}
    peers = {name: medians[name] for name in COMPILED if name in medians}
    if peers:
        best = min(peers, key=peers.get)
        result["best_peer"] = best
        if OURS in medians:
            result["vs_best_peer"] = peers[best] / medians[OURS]
    if OURS in medians and "torchvision eager" in medians:
        result["vs_eager"] = medians["torchvision eager"] / medians[OURS]
    if len(outputs) == 2:
        result["parity"] = _relative_errors(outputs[OURS], outputs["torchvision eager"])
    result["plans"] = [{key: str(value) if key == "signature" else value for key, value in entry.items()}
                       for entry in optimized.plans()]
    result["routes"] = _routes(optimized, lambda key: key == planned)
    return result


def _write(path, report) -> None:
    if path:
        with open(path + ".tmp", "w") as f:
            json.dump(report, f, indent=1, default=str)
        os.replace(path + ".tmp", path)  # never a half-written file, even if the run is cut


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dry", action="store_true", help="CPU, 64x96 images, groups " + ",".join(DRY_GROUPS))
    parser.add_argument("--groups", default=None, help="comma-separated, in order (default: all, " +
                        ",".join(DEFAULT_GROUPS) + ")")
    parser.add_argument("--variants", default=",".join(VARIANTS + ["compile max-autotune"]),
                        help="comma-separated subset of the rows")
    parser.add_argument("--max-autotune", action="store_true", help="add the compile max-autotune row")
    parser.add_argument("--size", type=int, nargs=2, default=[800, 1216], metavar=("H", "W"))
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", help="rewritten after each group")
    args = parser.parse_args()
    if args.dry:
        args.device, args.size, args.rounds, args.warmup = "cpu", [64, 96], 3, 1
    args.variants = [name.strip() for name in args.variants.split(",")]
    groups = args.groups.split(",") if args.groups else (DRY_GROUPS if args.dry else DEFAULT_GROUPS)
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        parser.error(f"unknown groups {unknown}; choose from {list(GROUPS)}")
    device = torch.device(args.device)
    report = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                  torch=torch.__version__, cuda=torch.version.cuda,
                  cudnn=torch.backends.cudnn.version() if device.type == "cuda" else None,
                  dry=args.dry, groups=[])
    begin = time.perf_counter()
    ours, theirs = build_models(0, device, torch.contiguous_format)
    optimized = fpn_fast.optimize_for_inference(ours)
    no_graphs = fpn_fast.optimize_for_inference(ours, cuda_graphs=False)
    report["setup_s"] = time.perf_counter() - begin
    _write(args.json, report)
    for group in groups:
        began = time.perf_counter()
        result = run_group(group, (theirs, optimized, no_graphs), device, args)
        result["group_s"] = time.perf_counter() - began
        report["groups"].append(result)
        _write(args.json, report)
        print(format_group(result), flush=True)
    return 0


def format_group(result: dict) -> str:
    """One line per row of a group: median, host time, first call / compile."""
    lines = [f"{result['group']} (batch {result['batch']}, {result['dtype']}, TF32 {'on' if result['tf32'] else 'off'})"
             f": optimized {result.get('vs_best_peer', float('nan')):.2f}x the best peer "
             f"({result.get('best_peer')}), {result.get('vs_eager', float('nan')):.2f}x eager"]
    for name, row in result["rows"].items():
        if "median_ms" in row:
            first = row.get("compile_s", row.get("first_call_s"))
            lines.append(f"  {name:<26} {row['median_ms']:8.2f} ms  host {row['host_us']:8.1f} us  "
                         f"first call {first:7.2f} s")
    lines.extend(f"  {name:<26} FAILED: {error[:200]}" for name, error in result["errors"].items())
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

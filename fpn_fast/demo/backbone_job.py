"""The backbone job (``python -m fpn_fast --model backbone``): the ResNet50-FPN backbone alone on a
random batch, every chosen fpn_fast backend checked against the torch reference and torchvision,
with optional ``optimize_for_inference`` and torch.compile max-autotune rows; the FPN neck and the
whole backbone timed. Everything runs in eval() under ``torch.inference_mode()``."""
import time
from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

import fpn_fast
from fpn_fast import ops

from .common import COMPILED, DTYPES, OPTIMIZED, REFERENCE, TORCHVISION, torchvision
from .models import build_models
from .parity import PARITY_BOUND, max_diff, parity_applies
from .timing import backend_reasons, machine_info, progress, selected_backends, sync, time_runs


@dataclass
class BackboneJob:
    """Options of :func:`run_backbone` (the CLI's ``--model backbone``)."""
    batch: int = 2
    size: Tuple[int, int] = (800, 1216)
    device: torch.device = torch.device("cpu")
    dtype: str = "float32"
    channels_last: bool = False
    backend: str = "all"
    warmup: int = 1
    repeats: int = 3
    optimize: bool = False
    compile: bool = False
    seed: int = 0


def run_backbone(job: BackboneJob) -> Dict[str, object]:
    """Check every fpn_fast backend against the torch reference and torchvision, and time the FPN
    neck and the whole ResNet50-FPN backbone on one random batch (random weights, seeded).

    Args:
        job: the options.

    Returns:
        The result (keys listed in docs/main_job.md); "failures" names the variants
        that raised or broke the parity bound.

    Raises:
        InputError: ``job.backend`` cannot run on the device.
    """
    started = time.perf_counter()
    device = job.device
    memory_format = torch.channels_last if job.channels_last else torch.contiguous_format
    reasons = backend_reasons(device.type)
    backends = selected_backends(job.backend, reasons)
    ours, theirs = build_models(job.seed, device, memory_format)
    generator = torch.Generator().manual_seed(job.seed)
    images = torch.randn(job.batch, 3, *job.size, generator=generator).to(device, memory_format=memory_format)
    dtype = DTYPES[job.dtype]
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    failures = {}

    def attempt(label: str, fn: Callable[[], object]):
        """fn(), or None when it raises: the error is recorded, the other variants still run."""
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

    optimized = attempt(OPTIMIZED, lambda: fpn_fast.optimize_for_inference(ours)) if job.optimize else None
    compile_s, optimized_first_call_s = None, None
    # variant label -> (whole backbone, FPN neck) callables
    with torch.inference_mode(), autocast:
        features = ours.body(images)
        variants = OrderedDict()
        if theirs is not None:
            variants[TORCHVISION] = (lambda: theirs(images), lambda: theirs.fpn(features))
        if job.compile:
            # mode="max-autotune": autotuned kernel templates and, on CUDA, CUDA graphs; dynamic=False:
            # one static graph for this size. Compiled by a first call each, here, outside the
            # timings; CUDA graph recording falls in the timing warm-up.
            compiled = OrderedDict((("backbone", (torch.compile(theirs, mode="max-autotune", dynamic=False), images)),
                                    ("neck", (torch.compile(theirs.fpn, mode="max-autotune", dynamic=False),
                                              features))))
            compile_s = OrderedDict()
            for part, (module, inputs) in compiled.items():
                start = time.perf_counter()
                if attempt(COMPILED, lambda: module(inputs)) is None:
                    break
                sync(device)
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

        outputs = {}
        with progress(len(variants), "checking outputs") as bar:
            for label, (whole, _) in list(variants.items()):
                start = time.perf_counter()
                out = attempt(label, whole)
                bar.update()
                if out is None:
                    del variants[label]
                    continue
                sync(device)
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
                (label, time_runs(fns[index], job.warmup, job.repeats, device, f"timing {part}, {label}"))
                for label, fns in variants.items())

    def ratios(against: Optional[str]):
        return {part: {label: rows[against]["median"] / row["median"] if against else None
                       for label, row in rows.items()} for part, rows in timings.items()}

    baseline = next((label for label in (TORCHVISION, f"fpn_fast {REFERENCE}") if label in variants), None)
    return {
        "mode": "backbone",
        "machine": machine_info(device),
        "config": {"batch": job.batch, "size": list(job.size), "dtype": job.dtype,
                   "channels_last": job.channels_last, "backend": job.backend,
                   "optimize": job.optimize, "compile": job.compile,
                   "warmup": job.warmup, "repeats": job.repeats, "seed": job.seed},
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

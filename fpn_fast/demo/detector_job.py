"""The detector job (the default of ``python -m fpn_fast``): a whole torchvision detector on
photographs, as a service runs it: the images go in as a list, the detector's own transform
resizes and batches them. Rows: torchvision eager, the same model after ``fpn_fast.convert``,
after ``fpn_fast.optimize_for_inference``, optionally torchvision's with its backbone compiled by
``torch.compile(mode="max-autotune")``. Per-image latency, images/s, the backbone's share of the
time, and parity against torchvision eager on the same photos: every pyramid level relative to
its largest magnitude, and the detections (greedy IoU matching). Everything runs in eval() under
``torch.inference_mode()``; nothing is downloaded.
"""
import copy
import math
import statistics
import time
from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

import fpn_fast
from fpn_fast import ops

from .common import COMPILED, CONVERTED, DTYPES, OPTIMIZED, TORCHVISION, InputError, first_line
from .models import build_detector, category_names, detector_classes, load_weights
from .parity import MATCH_IOU, PARITY_BOUND, level_diffs, match_detections, parity_applies, total_matches
from .photos import bundled_photos, find_images, load_image
from .timing import backend_reasons, machine_info, progress, summary_stats, sync


@dataclass
class DetectorJob:
    """Options of :func:`run_detector` (the CLI's default job); see ``python -m fpn_fast --help``."""
    model: str = "fasterrcnn_resnet50_fpn"
    images: Optional[Sequence[str]] = None  # files or folders; None: BUNDLED_PHOTOS
    weights: Optional[str] = None
    num_classes: Optional[int] = None
    model_args: Dict[str, object] = field(default_factory=dict)  # see build_detector
    min_size: int = 800
    max_size: int = 1333
    batch: int = 1
    device: torch.device = torch.device("cpu")
    dtype: str = "float32"
    backend: str = "auto"
    warmup: int = 0
    repeats: int = 2
    compile: bool = False
    seed: int = 0
    keep_images: int = 4  # photos whose pixels, heat maps and detections stay for the PNG report


class _Capture:
    """Forward hooks on a detector's transform and backbone: the resized image sizes and the
    pyramid of the last call (when ``keep``), and the time spent in the backbone."""

    def __init__(self, model: nn.Module, device: torch.device):
        self.device, self.keep = device, False
        self.backbone_s, self.pyramid, self.image_sizes, self.padded = 0.0, None, None, None
        self.first_by_shape: Dict[str, float] = OrderedDict()  # the backbone's first call per input shape
        self._start = 0.0
        self._handles = [model.backbone.register_forward_pre_hook(self._before),
                         model.backbone.register_forward_hook(self._after),
                         model.transform.register_forward_hook(self._sizes)]

    def _before(self, module, inputs):
        sync(self.device)
        self._start = time.perf_counter()

    def _after(self, module, inputs, output):
        sync(self.device)
        elapsed = time.perf_counter() - self._start
        self.backbone_s += elapsed
        self.first_by_shape.setdefault("x".join(str(size) for size in inputs[0].shape), elapsed)
        if self.keep:  # clones: a CUDA-graphed (max-autotune) backbone reuses its output buffers
            self.pyramid = OrderedDict((k, v.clone()) for k, v in output.items())

    def _sizes(self, module, inputs, output):
        self.image_sizes = list(output[0].image_sizes)
        self.padded = tuple(output[0].tensors.shape[-2:])

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _heat_map(level: Tensor, size: Tuple[int, int], padded: Tuple[int, int]) -> Tensor:
    """Mean |activation| over channels of one image's level, cropped to the image (not its padding)."""
    h = max(1, math.ceil(level.shape[-2] * size[0] / padded[0]))
    w = max(1, math.ceil(level.shape[-1] * size[1] / padded[1]))
    return level[:, :h, :w].float().abs().mean(0).cpu()


def run_detector(job: DetectorJob) -> Tuple[Dict[str, object], Dict[str, object]]:
    """Run a torchvision detector on photographs: eager, converted, optimized (and compiled).

    One check pass calls every variant on every batch, untimed (the first calls, with any compile,
    fall here), and compares each with torchvision eager: the pyramid levels per image relative to
    each level's largest magnitude, and the detections (:func:`match_detections`). Then each
    variant is timed over ``warmup`` + ``repeats`` passes over all photos, the variants in turn per
    round; the backbone's time is taken by forward hooks on ``model.backbone``.

    Args:
        job: the options.

    Returns:
        (result, pictures). result: JSON-ready numbers (keys and units in docs/main_job.md);
        its "failures" names the variants that raised or broke the pyramid parity bound.
        pictures: for :func:`fpn_fast.demo.report.write_detector_png`, "photos" (the first
        ``job.keep_images``: name, uint8 pixels, per-level heat maps of the optimized model, and
        the detections of torchvision eager and of that model) and "categories" (label names or None).

    Raises:
        InputError: a path, image or checkpoint that cannot be used, or a backend that cannot run.
    """
    started = time.perf_counter()
    device, dtype = job.device, DTYPES[job.dtype]
    reasons = backend_reasons(device.type)
    if job.backend != "auto" and reasons[job.backend] is not None:
        raise InputError(f"backend {job.backend!r} cannot run on this device: {reasons[job.backend]}")
    paths = find_images(job.images) if job.images else bundled_photos()
    photos = [load_image(p) for p in paths]
    tv = build_detector(job.model, num_classes=job.num_classes, min_size=job.min_size, max_size=job.max_size,
                        seed=job.seed, model_args=job.model_args)
    weights_kind = load_weights(tv, job.weights, job.model) if job.weights else None
    tv.to(device)
    failures = {}

    def attempt(label: str, fn: Callable[[], object]):
        try:
            return fn()
        except Exception as err:
            failures[label] = f"{type(err).__name__}: {first_line(err)}"
            return None

    variants = OrderedDict([(TORCHVISION, tv)])
    variants[CONVERTED] = fpn_fast.convert(copy.deepcopy(tv))
    optimized = attempt(OPTIMIZED, lambda: fpn_fast.optimize_for_inference(tv))
    if optimized is not None:
        variants[OPTIMIZED] = optimized
    if job.compile:
        # Only the backbone is compiled (the part fpn_fast replaces): dynamic=False compiles one
        # graph per padded batch shape, in the check pass; heads and NMS stay eager.
        compiled = copy.deepcopy(tv)
        compiled.backbone = torch.compile(compiled.backbone, mode="max-autotune", dynamic=False)
        variants[COMPILED] = compiled
    backend = ops.use_backend(job.backend)

    batches = [photos[i:i + job.batch] for i in range(0, len(photos), job.batch)]
    inputs = [[(p.to(device) / 255.0) for p in batch] for batch in batches]
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    first_call_s = OrderedDict()
    per_image = [{"name": p.name, "path": str(p), "size": list(photo.shape[1:]), "resized": None,
                  "pyramid": OrderedDict(), "detections": OrderedDict()} for p, photo in zip(paths, photos)]
    kept = []  # for the report: per kept photo, its pixels, heat maps and detections

    with torch.inference_mode(), autocast, backend:
        captures = OrderedDict((label, _Capture(model, device)) for label, model in variants.items())
        with progress(len(batches) * len(variants), "checking outputs on every photo") as bar:
            for b, batch in enumerate(inputs):
                first = b * job.batch
                outputs = OrderedDict()
                for label, model in list(variants.items()):
                    capture = captures[label]
                    capture.keep = True
                    start = time.perf_counter()
                    detections = attempt(label, lambda: model(batch))
                    sync(device)
                    bar.update()
                    capture.keep = False
                    if detections is None:
                        del variants[label]
                        captures.pop(label).remove()
                        continue
                    first_call_s.setdefault(label, time.perf_counter() - start)
                    outputs[label] = (capture.pyramid, [{k: v.cpu() for k, v in d.items()} for d in detections],
                                      capture.image_sizes, capture.padded)
                    capture.pyramid = None
                if TORCHVISION not in outputs:
                    raise RuntimeError(f"torchvision eager failed: {failures.get(TORCHVISION)}")
                ref_pyramid, ref_detections, sizes, padded = outputs[TORCHVISION]
                for i in range(len(batch)):
                    row = per_image[first + i]
                    row["resized"] = list(sizes[i])
                    for label, (pyramid, detections, _, _) in outputs.items():
                        if label == TORCHVISION:
                            continue
                        row["pyramid"][label] = level_diffs(OrderedDict((k, v[i]) for k, v in pyramid.items()),
                                                            OrderedDict((k, v[i]) for k, v in ref_pyramid.items()))
                        row["detections"][label] = match_detections(ref_detections[i], detections[i])
                    if first + i < job.keep_images:
                        shown = OPTIMIZED if OPTIMIZED in outputs else TORCHVISION
                        kept.append({"name": row["name"], "photo": photos[first + i],
                                     "heat_maps": OrderedDict((k, _heat_map(v[i], sizes[i], padded))
                                                              for k, v in outputs[shown][0].items()),
                                     "heat_maps_of": shown,
                                     "detections": OrderedDict((label, outputs[label][1][i])
                                                               for label in (TORCHVISION, shown))})
                del outputs, ref_pyramid

        # Rounds in turn (each row one pass over all photos per round), so that a load change on a
        # shared machine falls on every row rather than on whichever was timed then.
        passes = OrderedDict((label, []) for label in variants)
        backbone_passes = OrderedDict((label, []) for label in variants)
        with progress((job.warmup + job.repeats) * len(variants) * len(inputs), "timing") as bar:
            for r in range(job.warmup + job.repeats):
                for label, model in variants.items():
                    captures[label].backbone_s = 0.0
                    sync(device)
                    start = time.perf_counter()
                    for batch in inputs:
                        model(batch)
                        bar.update()
                    sync(device)
                    if r >= job.warmup:
                        passes[label].append(time.perf_counter() - start)
                        backbone_passes[label].append(captures[label].backbone_s)
        for capture in captures.values():
            capture.remove()
        n = len(photos)
        timings = OrderedDict()
        for label in variants:
            median = statistics.median(passes[label])
            timings[label] = {
                "pass_s": summary_stats(passes[label]), "backbone_pass_s": summary_stats(backbone_passes[label]),
                "per_image_ms": median / n * 1e3, "images_per_s": n / median,
                "backbone_per_image_ms": statistics.median(backbone_passes[label]) / n * 1e3,
                "backbone_share": statistics.median(b / p for b, p in zip(backbone_passes[label], passes[label])),
                "first_call_s": first_call_s[label],
                "backbone_first_call_s": dict(captures[label].first_by_shape)}

    levels = list(next(iter(per_image[0]["pyramid"].values()), {}))
    compared = [label for label in variants if label != TORCHVISION]
    pyramid = OrderedDict((label, OrderedDict((level, max(row["pyramid"][label][level]["rel"] for row in per_image))
                                              for level in levels)) for label in compared)
    applies = parity_applies(dtype, device)
    within = OrderedDict((label, all(rel <= PARITY_BOUND for rel in worst.values()))
                         for label, worst in pyramid.items())
    for label, ok in within.items():
        if applies and not ok:
            failures[label] = (f"pyramid outside the float32 parity bound ({PARITY_BOUND:g} of each level's "
                               f"largest value): worst {max(pyramid[label].values()):.2e}")
    base = timings[TORCHVISION]

    def speedups(against: Dict[str, object]) -> Dict[str, Dict[str, float]]:
        return OrderedDict((label, {"detector": against["pass_s"]["median"] / t["pass_s"]["median"],
                                    "backbone": against["backbone_pass_s"]["median"] / t["backbone_pass_s"]["median"]})
                           for label, t in timings.items())

    num_classes = detector_classes(tv)
    result = {
        "mode": "detector",
        "machine": machine_info(device),
        "config": {"model": job.model, "weights": job.weights, "weights_kind": weights_kind,
                   "num_classes": num_classes, "model_args": dict(job.model_args), "min_size": job.min_size,
                   "max_size": job.max_size,
                   "batch": job.batch, "device": str(device), "dtype": job.dtype, "backend": job.backend,
                   "compile": job.compile, "warmup": job.warmup, "repeats": job.repeats, "seed": job.seed,
                   "match_iou": MATCH_IOU},
        "backends": {name: {"available": reason is None, "reason": reason} for name, reason in reasons.items()},
        "images": per_image,
        "variants": list(variants),
        "pyramid": pyramid,
        "parity": {"bound": PARITY_BOUND, "applies": applies, "within": within},
        "detections": OrderedDict((label, total_matches([row["detections"][label] for row in per_image]))
                                  for label in compared),
        "timings": timings,
        "speedups": speedups(base),
        "speedups_vs_compiled": speedups(timings[COMPILED]) if COMPILED in timings else None,
        "failures": failures,
        "runtime_s": time.perf_counter() - started,
    }
    return result, {"photos": kept, "categories": category_names(job.model, num_classes)}

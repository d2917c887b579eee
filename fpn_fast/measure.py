"""The measuring layer of ``python -m fpn_fast`` and of the pytest-benchmark suites (benchmarks/).

Two jobs, each returning its numbers as a JSON-ready dict (the detector job also the pictures for the
PNG report); nothing is printed but progress bars on stderr:

- :func:`run_detector`: a whole torchvision detector on photographs, as a service runs it: the
  images go in as a list, the detector's own transform resizes and batches them. Rows:
  torchvision eager, the same model after ``fpn_fast.convert``, after
  ``fpn_fast.optimize_for_inference``, optionally torchvision's with its backbone compiled by
  ``torch.compile(mode="max-autotune")``. Per-image latency, images/s, the backbone's share of
  the time, and parity against torchvision eager on the same photos: every pyramid level relative
  to its largest magnitude, and the detections (greedy IoU matching).
- :func:`run_backbone`: the ResNet50-FPN backbone alone on a random batch, per fpn_fast backend.

Everything runs in eval() under ``torch.inference_mode()``; nothing is downloaded. torchvision is
needed for the detector job and for the torchvision rows of the backbone job; this module is not
imported by ``import fpn_fast``.
"""
import copy
import inspect
import math
import os
import platform
import statistics
import sys
import time
from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from tqdm import tqdm

import fpn_fast
from fpn_fast import ops
from fpn_fast.ops.lateral._triton import cudnn_conv_allows_tf32

try:
    import torchvision
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone as tv_resnet_fpn_backbone
except ImportError:  # optional for the backbone job: its torchvision rows are skipped and the report says so
    torchvision = None

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DETECTORS = ("fasterrcnn_resnet50_fpn", "fasterrcnn_resnet50_fpn_v2", "maskrcnn_resnet50_fpn",
             "keypointrcnn_resnet50_fpn", "retinanet_resnet50_fpn")
# The torchvision detectors that freeze their body's norms when built with weights (all but v2,
# which keeps BatchNorm2d): built the same way here, so their checkpoints load strictly.
_FROZEN_NORM_DETECTORS = tuple(name for name in DETECTORS if not name.endswith("_v2"))

TORCHVISION = "torchvision eager"
REFERENCE = "torch"  # the fpn_fast backend every other one is compared with in the backbone job
CONVERTED = "fpn_fast converted"  # fpn_fast.convert(copy of the torchvision detector)
OPTIMIZED = "fpn_fast optimized"  # fpn_fast.optimize_for_inference(...)
COMPILED = "torchvision max-autotune"  # torch.compile(torchvision's backbone, mode="max-autotune")
# The optimized model's float32 parity bound (tests/test_inference.py): every output level within
# 1e-4 of that level's largest magnitude. It does not hold for TF32 or low-precision runs.
PARITY_BOUND = 1e-4
# Detections are matched greedily, reference boxes by descending score, at this IoU or more.
MATCH_IOU = 0.5

# Photographs inside scikit-image's wheel (skimage/data; never fetched at run time). Sources and
# licences, from skimage.data's docstrings:
#   astronaut.png  512x512  Eileen Collins, NASA Great Images database: public domain
#   chelsea.png    300x451  Chelsea the cat, by Stefan van der Walt: CC0
#   rocket.jpg     427x640  DSCOVR launch on Falcon 9, SpaceX photos: public domain
BUNDLED_PHOTOS = ("astronaut.png", "chelsea.png", "rocket.jpg")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class InputError(ValueError):
    """A path, image or checkpoint the job cannot use; the message is one line for the user."""


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# ---------------------------------------------------------------------------------------------
# What can run here

def backend_reasons(device_type: str) -> Dict[str, Optional[str]]:
    """Which fpn_fast backends can be timed on a device type.

    Args:
        device_type: "cpu" or "cuda".

    Returns:
        {backend: None if it runs on ``device_type``, else the reason why not}. The Triton
        interpreter is a correctness tool, so Triton on CPU is reported unavailable even when it is
        switched on.
    """
    reasons = {name: per_device.get(device_type, f"no {device_type} support")
               for name, per_device in ops.available_backends().items()}
    if device_type == "cpu" and reasons.get("triton") is None:
        reasons["triton"] = "on CPU Triton runs only in its interpreter (TRITON_INTERPRET=1): not timed"
    return reasons


def selected_backends(choice: str, reasons: Dict[str, Optional[str]]) -> List[str]:
    """The backbone job's backends: the reference first, then the chosen available ones.

    Args:
        choice: "all" or one name of ``ops.BACKENDS``.
        reasons: :func:`backend_reasons` of the device.

    Returns:
        Backend names, ``REFERENCE`` first, no duplicates.

    Raises:
        InputError: ``choice`` names a backend that cannot run on the device.
    """
    if choice == "all":
        chosen = [name for name in ops.BACKENDS if name != "auto" and reasons[name] is None]
    elif choice != "auto" and reasons[choice] is not None:
        raise InputError(f"backend {choice!r} cannot run on this device: {reasons[choice]}")
    else:
        chosen = [choice]
    return [REFERENCE] + [name for name in chosen if name != REFERENCE]


def machine_info(device: torch.device) -> Dict[str, object]:
    """Platform, CPU model, core and thread counts, GPU name and package versions.

    Args:
        device: the device the job runs on.

    Returns:
        A JSON-ready dict (see the README's "Main job" section).
    """
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


def parity_applies(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether ``PARITY_BOUND`` holds for a run.

    The 1e-4 bound is one of IEEE float32: not of autocast runs, nor of CUDA float32 runs whose
    convolutions use TF32 (cudnn.allow_tf32, torch's default; the fused lateral kernel follows the
    same flags), where each product keeps 10 bits.

    Args:
        dtype: the run's compute dtype (float32, or an autocast dtype).
        device: the run's device.

    Returns:
        True when the outputs must agree to ``PARITY_BOUND``.
    """
    if dtype != torch.float32:
        return False
    return device.type != "cuda" or not cudnn_conv_allows_tf32()


# ---------------------------------------------------------------------------------------------
# Measuring

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def summary_stats(times: Sequence[float]) -> Dict[str, float]:
    """Median, min, max and quartiles of a list of durations.

    Args:
        times: at least one duration, in seconds.

    Returns:
        {"median", "min", "max", "q1", "q3"} in seconds and "runs" (the count).
    """
    q1, _, q3 = statistics.quantiles(times, n=4) if len(times) > 1 else list(times) * 3
    return {"median": statistics.median(times), "min": min(times), "max": max(times),
            "q1": q1, "q3": q3, "runs": len(times)}


def progress(total: int, label: str) -> tqdm:
    """A progress bar on stderr, prefixed ``[fpn-fast]``.

    Args:
        total: the number of steps.
        label: what is being done.

    Returns:
        A ``tqdm`` bar; call ``update()`` per step and ``close()`` at the end.
    """
    return tqdm(total=total, desc=f"[fpn-fast] {label}", file=sys.stderr, unit="run", dynamic_ncols=True)


def time_runs(fn: Callable[[], object], warmup: int, repeats: int, device: torch.device,
              label: str) -> Dict[str, float]:
    """Time ``repeats`` calls of ``fn`` after ``warmup`` untimed ones.

    On a GPU each call is bracketed by synchronisations, so the time is the device's.

    Args:
        fn: the call to time.
        warmup: untimed calls first (>= 0).
        repeats: timed calls (>= 1).
        device: where ``fn`` runs.
        label: the progress bar's label.

    Returns:
        :func:`summary_stats` of the timed calls, in seconds.
    """
    times = []
    with progress(warmup + repeats, label) as bar:
        for i in range(warmup + repeats):
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            if i >= warmup:
                times.append(time.perf_counter() - start)
            bar.update()
    return summary_stats(times)


def max_diff(outputs: Dict[str, Tensor], reference: Dict[str, Tensor]) -> Dict[str, float]:
    """The largest differences between two feature pyramids.

    Args:
        outputs: {level: Tensor[N, C, H, W]}.
        reference: the same levels and shapes.

    Returns:
        "abs": the largest |a - b| over all levels; "rel": that divided by the largest |b| of all
        levels (a scale-aware relative error that stays finite where the reference is near zero);
        "level_rel": the worst level's largest |a - b| divided by that level's largest |b| (what the
        parity bound is stated in: the coarse levels have a smaller scale than the fine ones).
    """
    per_level = level_diffs(outputs, reference)
    abs_diff = max(d["abs"] for d in per_level.values())
    scale = max(d["scale"] for d in per_level.values())
    return {"abs": abs_diff, "rel": abs_diff / scale if scale > 0 else abs_diff,
            "level_rel": max(d["rel"] for d in per_level.values())}


def level_diffs(outputs: Dict[str, Tensor], reference: Dict[str, Tensor]) -> Dict[str, Dict[str, float]]:
    """Per pyramid level: the largest |a - b|, the level's largest |b|, and their ratio.

    Args:
        outputs: {level: Tensor[...]}.
        reference: the same levels and shapes.

    Returns:
        {level: {"abs", "scale", "rel"}}; "rel" = abs / scale (abs itself when the scale is 0).
    """
    result = OrderedDict()
    for level, ref in reference.items():
        ref = ref.float()
        diff = (outputs[level].float() - ref).abs().max().item()
        scale = ref.abs().max().item()
        result[level] = {"abs": diff, "scale": scale, "rel": diff / scale if scale > 0 else diff}
    return result


def match_detections(reference: Dict[str, Tensor], other: Dict[str, Tensor],
                     iou_threshold: float = MATCH_IOU) -> Dict[str, object]:
    """Match one image's detections against a reference's.

    Reference boxes, by descending score, each take the still unmatched other box of highest IoU
    if that IoU is at least ``iou_threshold``; labels need not agree (disagreements are counted).

    Args:
        reference: {"boxes": Tensor[R, 4] (x1, y1, x2, y2), "scores": Tensor[R], "labels": Tensor[R]}.
        other: the same keys, Tensor[O, ...].
        iou_threshold: the least IoU of a match.

    Returns:
        {"reference", "other": the counts, "matched", "unmatched_reference", "unmatched_other",
        "min_iou", "mean_iou" (None without a match), "max_score_diff" (largest |score difference|
        of matched pairs, None without a match), "label_mismatches" (matched pairs whose labels
        differ)}.
    """
    ref_boxes, ref_scores, ref_labels = (reference[k].detach().cpu() for k in ("boxes", "scores", "labels"))
    boxes, scores, labels = (other[k].detach().cpu() for k in ("boxes", "scores", "labels"))
    ious = torchvision.ops.box_iou(ref_boxes.float(), boxes.float())
    taken = torch.zeros(len(boxes), dtype=torch.bool)
    pair_ious, score_diffs, label_mismatches = [], [], 0
    for r in torch.argsort(ref_scores, descending=True).tolist():
        if len(boxes) == 0:
            break
        candidates = ious[r].masked_fill(taken, -1.0)
        best = int(candidates.argmax())
        if candidates[best] < iou_threshold:
            continue
        taken[best] = True
        pair_ious.append(float(candidates[best]))
        score_diffs.append(abs(float(ref_scores[r]) - float(scores[best])))
        label_mismatches += int(ref_labels[r] != labels[best])
    matched = len(pair_ious)
    return {"reference": len(ref_boxes), "other": len(boxes), "matched": matched,
            "unmatched_reference": len(ref_boxes) - matched, "unmatched_other": len(boxes) - matched,
            "min_iou": min(pair_ious) if pair_ious else None,
            "mean_iou": statistics.fmean(pair_ious) if pair_ious else None,
            "max_score_diff": max(score_diffs) if score_diffs else None,
            "label_mismatches": label_mismatches}


def total_matches(per_image: Sequence[Dict[str, object]]) -> Dict[str, object]:
    """Sum :func:`match_detections` results over images.

    Args:
        per_image: one result per image.

    Returns:
        The same keys: counts summed, "min_iou" the least, "mean_iou" the match-weighted mean,
        "max_score_diff" the largest (None where no image had a match).
    """
    counts = ("reference", "other", "matched", "unmatched_reference", "unmatched_other", "label_mismatches")
    total = {key: sum(m[key] for m in per_image) for key in counts}
    with_matches = [m for m in per_image if m["matched"]]
    total["min_iou"] = min((m["min_iou"] for m in with_matches), default=None)
    total["mean_iou"] = (sum(m["mean_iou"] * m["matched"] for m in with_matches) / total["matched"]
                         if with_matches else None)
    total["max_score_diff"] = max((m["max_score_diff"] for m in with_matches), default=None)
    return total


# ---------------------------------------------------------------------------------------------
# Inputs: photographs and checkpoints

def bundled_photos() -> List[Path]:
    """The default photographs (``BUNDLED_PHOTOS``), from scikit-image's installed package data.

    Returns:
        Their paths.

    Raises:
        InputError: scikit-image is not installed or lacks one of them.
    """
    try:
        from importlib.resources import files
        folder = Path(str(files("skimage.data")))
    except ModuleNotFoundError:
        raise InputError("the default photographs come with scikit-image (pip install scikit-image); "
                         "or pass your own with --images") from None
    paths = [folder / name for name in BUNDLED_PHOTOS]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise InputError(f"scikit-image at {folder} lacks the photographs {missing}; pass --images")
    return paths


def find_images(paths: Sequence[str]) -> List[Path]:
    """Image files from files and folders.

    Args:
        paths: files (any name; decoded later), or folders whose ``*.jpg``, ``*.jpeg`` and ``*.png``
            files (not recursive, sorted by name) are taken.

    Returns:
        The image paths, in the order given.

    Raises:
        InputError: a path does not exist, or a folder holds no JPEG/PNG file.
    """
    found = []
    for text in paths:
        path = Path(text)
        if path.is_dir():
            images = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not images:
                raise InputError(f"--images {text}: the folder holds no .jpg, .jpeg or .png file")
            found.extend(images)
        elif path.is_file():
            found.append(path)
        else:
            raise InputError(f"--images {text}: no such file or folder")
    return found


def load_image(path: Path) -> Tensor:
    """Decode an image file (JPEG, PNG, or anything else Pillow reads) as RGB.

    Args:
        path: the file.

    Returns:
        Tensor[3, H, W] uint8: EXIF orientation applied, grey, palette and RGBA images converted to RGB.

    Raises:
        InputError: the file cannot be read or decoded.
    """
    from PIL import Image, ImageOps
    from torchvision.transforms.functional import pil_to_tensor
    try:
        with Image.open(path) as image:
            return pil_to_tensor(ImageOps.exif_transpose(image).convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as err:  # UnidentifiedImageError is an OSError
        raise InputError(f"cannot decode {path} as an image: {_first_line(err)}") from None


def _state_dict_of(path: str) -> Dict[str, Tensor]:
    if not os.path.isfile(path):
        raise InputError(f"--weights {path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises many types for a file that is not a checkpoint
        raise InputError(f"--weights {path}: not a PyTorch checkpoint ({_first_line(err)})") from None
    for wrapper in ("model", "state_dict"):  # training scripts save {"model": ..., "optimizer": ...}
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise InputError(f"--weights {path}: not a state_dict (a mapping of names to tensors)")
    if all(k.startswith("module.") for k in state):  # saved from DistributedDataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_weights(model: nn.Module, path: str, model_name: str) -> str:
    """Load a local checkpoint into a torchvision detector, strictly.

    Args:
        model: a torchvision detector (``model.backbone.body`` its ResNet).
        path: a ``torch.save``d state_dict (also wrapped as {"model": ...} or {"state_dict": ...}) of
            the whole detector (keys ``backbone.*``, ``rpn.*``/``head.*``, ``roi_heads.*``), of its
            backbone (``body.*``, ``fpn.*``) or of a ResNet classifier (``conv1.*``...; ``fc.*``
            ignored).
        model_name: the detector's name, for messages.

    Returns:
        What the checkpoint held: "detector", "backbone" or "classifier".

    Raises:
        InputError: missing file, not a state_dict, or keys / shapes that do not fit ``model``.
    """
    state = _state_dict_of(path)
    if any(k.startswith("backbone.") for k in state):
        kind, target = "detector", model
    elif any(k.startswith(("body.", "fpn.")) for k in state):
        kind, target = "backbone", model.backbone
    elif "conv1.weight" in state:
        kind, target = "classifier", model.backbone.body
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    else:
        raise InputError(f"--weights {path}: neither a detector, a backbone nor a ResNet classifier state_dict "
                         f"(first key {next(iter(state))!r})")
    expected = target.state_dict()
    # torchvision's frozen norms have no num_batches_tracked; BatchNorm2d checkpoints do
    state = {k: v for k, v in state.items() if k in expected or not k.endswith(".num_batches_tracked")}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k} {list(state[k].shape)} vs {list(v.shape)}" for k, v in expected.items()
                  if k in state and state[k].shape != v.shape]
    problems = [f"{len(keys)} {what} (first: {keys[0]})" for what, keys in
                (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched))
                if keys]
    if problems:
        hint = " (--num-classes?)" if any("predictor" in k or "head" in k for k in mismatched) else ""
        raise InputError(f"--weights {path} ({kind} checkpoint) does not fit {model_name}: "
                         f"{'; '.join(problems)}{hint}")
    target.load_state_dict(state, strict=True)
    return kind


# ---------------------------------------------------------------------------------------------
# Models

def build_models(seed: int, device: torch.device, memory_format: torch.memory_format):
    """The backbone job's models: fpn_fast's ResNet50-FPN backbone and torchvision's with the same
    weights.

    Args:
        seed: seeds the random initialisation.
        device: where the models go.
        memory_format: their parameters' memory format.

    Returns:
        [fpn_fast backbone, torchvision backbone or None without torchvision], both in eval().
    """
    torch.manual_seed(seed)
    ours = fpn_fast.resnet50_fpn_backbone(weights=None)
    theirs = None
    if torchvision is not None:
        theirs = tv_resnet_fpn_backbone(backbone_name="resnet50", weights=None)
        theirs.load_state_dict(ours.state_dict())
    return [m.eval().to(device, memory_format=memory_format) if m is not None else None for m in (ours, theirs)]


def _freeze_norms(module: nn.Module) -> None:
    """Replace every BatchNorm2d below ``module`` by torchvision's FrozenBatchNorm2d, as torchvision's
    builders do when given weights (its random-init builds keep BatchNorm2d)."""
    from torchvision.ops.misc import FrozenBatchNorm2d
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            setattr(module, name, FrozenBatchNorm2d(child.num_features, eps=child.eps))
        else:
            _freeze_norms(child)


def randomize_norms(module: nn.Module, seed: int) -> int:
    """Give every norm below ``module`` random statistics and affine parameters, so that a randomly
    initialised backbone computes features of varied scale per channel instead of identity norms.

    Args:
        module: any module; its BatchNorm2d and FrozenBatchNorm2d (torchvision's or fpn_fast's) change.
        seed: seeds the values.

    Returns:
        The number of norms changed.
    """
    generator = torch.Generator().manual_seed(seed)
    count = 0
    with torch.no_grad():
        for m in module.modules():
            if not all(isinstance(getattr(m, k, None), Tensor) for k in ("weight", "bias", "running_mean",
                                                                         "running_var")):
                continue
            shape = m.running_mean.shape
            m.running_mean.copy_(torch.randn(shape, generator=generator) * 0.1)
            m.running_var.copy_(torch.rand(shape, generator=generator) * 1.5 + 0.5)
            m.weight.copy_(torch.rand(shape, generator=generator) + 0.5)
            m.bias.copy_(torch.randn(shape, generator=generator) * 0.1)
            count += 1
    return count


def build_detector(name: str, *, num_classes: Optional[int] = None, min_size: int = 800, max_size: int = 1333,
                   seed: int = 0, model_args: Optional[Dict[str, object]] = None) -> nn.Module:
    """A torchvision detector with seeded random weights and random norm statistics, in eval().

    Args:
        name: one of ``DETECTORS``.
        num_classes: classes of its heads (torchvision's default for the model when None).
        min_size: its transform's ``min_size`` (shorter image side after resizing).
        max_size: its transform's ``max_size`` (longer side at most).
        seed: seeds every random value.
        model_args: more keyword arguments of the torchvision builder and model, e.g.
            ``box_detections_per_img`` or ``rpn_post_nms_top_n_test`` (R-CNNs), ``detections_per_img``
            (RetinaNet), ``box_score_thresh``.

    Returns:
        The detector; its body's norms are frozen as in torchvision's trained models (all but the
        v2 Faster R-CNN, which keeps BatchNorm2d), so torchvision checkpoints load strictly.

    Raises:
        RuntimeError: torchvision is not installed.
        ValueError: ``name`` is not in ``DETECTORS``.
        InputError: the model does not take one of ``model_args``.
    """
    if torchvision is None:
        raise RuntimeError("the detector job needs torchvision (pip install torchvision)")
    if name not in DETECTORS:
        raise ValueError(f"unknown detector {name!r}; choose from {DETECTORS}")
    kwargs = {"weights": None, "weights_backbone": None, "min_size": min_size, "max_size": max_size}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    torch.manual_seed(seed)
    builder = getattr(torchvision.models.detection, name)
    try:
        model = builder(**kwargs, **(model_args or {}))
    except TypeError as err:  # an argument the model does not take
        raise InputError(f"{name} with model arguments {model_args}: {_first_line(err)}") from None
    # The R-CNN transform swallows unknown keyword arguments: name them instead of ignoring them.
    accepted = {p.name for fn in [builder, type(model.transform).__init__] + [c.__init__ for c in type(model).__mro__]
                for p in inspect.signature(fn).parameters.values()
                if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self"}
    unknown = sorted(set(model_args or {}) - accepted)
    if unknown:
        raise InputError(f"{name} takes no argument {unknown[0]!r}")
    if name in _FROZEN_NORM_DETECTORS:
        _freeze_norms(model.backbone.body)
    randomize_norms(model.backbone, seed)
    return model.eval()


def category_names(name: str, num_classes: int) -> Optional[List[str]]:
    """COCO category names of a detector, from torchvision's weights metadata (nothing downloaded).

    Args:
        name: one of ``DETECTORS``.
        num_classes: the detector's class count.

    Returns:
        Names indexed by label, or None when ``num_classes`` is not the COCO weights' count.
    """
    weights = torchvision.models.get_model_weights(name)
    categories = next(iter(weights)).meta.get("categories")
    return list(categories) if categories and len(categories) == num_classes else None


def _num_classes(model: nn.Module) -> int:
    roi_heads = getattr(model, "roi_heads", None)
    if roi_heads is not None:
        return roi_heads.box_predictor.cls_score.out_features
    return model.head.classification_head.num_classes


# ---------------------------------------------------------------------------------------------
# The backbone job

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
        The result (keys listed in the README's "Main job" section); "failures" names the variants
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

        outputs = {}
        with progress(len(variants), "checking outputs") as bar:
            for label, (whole, _) in list(variants.items()):
                start = time.perf_counter()
                out = attempt(label, whole)
                bar.update()
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


# ---------------------------------------------------------------------------------------------
# The detector job

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
        _sync(self.device)
        self._start = time.perf_counter()

    def _after(self, module, inputs, output):
        _sync(self.device)
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
        (result, pictures). result: JSON-ready numbers (keys and units in the README's "Main job"
        section); its "failures" names the variants that raised or broke the pyramid parity bound.
        pictures: for :func:`fpn_fast.report.write_detector_png`, "photos" (the first
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
            failures[label] = f"{type(err).__name__}: {_first_line(err)}"
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
                    _sync(device)
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
                    _sync(device)
                    start = time.perf_counter()
                    for batch in inputs:
                        model(batch)
                        bar.update()
                    _sync(device)
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

    num_classes = _num_classes(tv)
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

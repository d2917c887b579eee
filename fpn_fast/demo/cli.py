"""``python -m fpn_fast``: is fpn_fast the same, and how much faster, on a whole detector and real photos?

Runs a torchvision detector (default fasterrcnn_resnet50_fpn; random weights unless --weights) on
photographs (scikit-image's bundled ones unless --images) as torchvision eager, after
fpn_fast.convert, after fpn_fast.optimize_for_inference (and with --compile torchvision's with its
backbone compiled by torch.compile max-autotune); reports per-image latency, images/s, the
backbone's share, and parity of the pyramid levels and detections against torchvision eager.
``--model backbone`` times the ResNet50-FPN backbone alone on a random batch, per fpn_fast backend.

This module is only the command line; the work is in the jobs (:mod:`fpn_fast.demo.detector_job`,
:mod:`fpn_fast.demo.backbone_job`) and :mod:`fpn_fast.demo.report`. Exit status: 0 ok, 1 a variant
failed or broke the parity bound, 2 a usage error, a bad path, an unreadable image or a checkpoint
that does not fit.
"""
import argparse
import ast
import dataclasses
import json
import os
import sys
from typing import List, Optional

import torch

from fpn_fast import ops

from . import report
from .backbone_job import BackboneJob, run_backbone
from .common import DTYPES, InputError, torchvision
from .detector_job import DetectorJob, run_detector
from .models import DETECTORS

MODELS = DETECTORS + ("backbone",)
# Options of one job only: given to the other job they are a usage error.
_BACKBONE_ONLY = ("size", "channels_last", "optimize")
_DETECTOR_ONLY = ("images", "weights", "num_classes", "model_args", "min_size", "max_size")
# Set by their own options or by the job.
_RESERVED_MODEL_ARGS = ("weights", "weights_backbone", "num_classes", "min_size", "max_size", "progress")


def _size(text: str):
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be HxW, e.g. 800x1216, not {text!r}")
    if h < 32 or w < 32:
        raise argparse.ArgumentTypeError(f"size must be at least 32x32 (five stride-2 stages), not {text!r}")
    return h, w


def _model_arg(text: str):
    name, sep, value = text.partition("=")
    if not sep or not name.isidentifier():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, e.g. box_detections_per_img=20, not {text!r}")
    try:
        return name, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return name, value  # a plain string


def _at_least(low: int):
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, not {text}")
        return value
    return parse


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Parse and check the command line; job-specific defaults are filled in.

    Args:
        argv: the arguments (``sys.argv[1:]`` when None).

    Returns:
        The options; ``device`` is a ``torch.device``.

    Raises:
        SystemExit: with status 2 and argparse's usage message on a bad option.
    """
    p = argparse.ArgumentParser(prog="fpn-fast", description=__doc__.split("\n\n")[0].replace("``", ""))
    p.add_argument("--model", choices=MODELS, default="fasterrcnn_resnet50_fpn",
                   help="torchvision detector to run, or 'backbone' (the ResNet50-FPN backbone alone on a "
                        "random batch, per fpn_fast backend); default fasterrcnn_resnet50_fpn")
    p.add_argument("--images", nargs="+", metavar="PATH",
                   help="JPEG/PNG files or folders of them (default: photographs bundled with scikit-image)")
    p.add_argument("--weights", metavar="PATH",
                   help="local checkpoint: a torchvision detector state_dict, or of its backbone, or of a ResNet "
                        "classifier (default: seeded random weights and norm statistics)")
    p.add_argument("--num-classes", type=_at_least(2), metavar="N",
                   help="classes of the detector's heads (default: torchvision's)")
    p.add_argument("--model-arg", type=_model_arg, action="append", default=[], metavar="NAME=VALUE",
                   dest="model_args", help="another argument of the torchvision detector, e.g. box_score_thresh=0.3, "
                                           "box_detections_per_img=20, rpn_post_nms_top_n_test=300 (repeatable)")
    p.add_argument("--min-size", type=_at_least(32), metavar="PIXELS",
                   help="detector transform's min_size (default 800)")
    p.add_argument("--max-size", type=_at_least(32), metavar="PIXELS",
                   help="detector transform's max_size (default 1333)")
    p.add_argument("--batch", type=_at_least(1), metavar="N", help="images per call (default: detector 1, backbone 2)")
    p.add_argument("--size", type=_size, metavar="HxW", help="backbone job: image size (default 800x1216)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                   help="bfloat16/float16 run under autocast (default float32)")
    p.add_argument("--channels-last", action="store_true", help="backbone job: model and input in channels_last")
    p.add_argument("--backend", choices=("all",) + ops.BACKENDS, default=None,
                   help="fpn_fast backend: detector job one of them (default auto); backbone job the ones to "
                        "check and time (default all available)")
    p.add_argument("--repeats", type=_at_least(1), metavar="N",
                   help="timed passes over all photos (detector) or runs (backbone) per row "
                        "(default: detector cpu 2, cuda 10; backbone cpu 3, cuda 20)")
    p.add_argument("--warmup", type=_at_least(0), metavar="N",
                   help="untimed passes or runs first (default: detector cpu 0, cuda 2, after its untimed check "
                        "pass; backbone cpu 1, cuda 5)")
    p.add_argument("--optimize", action="store_true",
                   help="backbone job: also fpn_fast.optimize_for_inference(backbone) (the detector job always has it)")
    p.add_argument("--compile", action="store_true",
                   help='also torchvision with torch.compile(mode="max-autotune") of its backbone (detector job) '
                        "or of its backbone and neck (backbone job); compiled before the timings, minutes on CPU")
    p.add_argument("--seed", type=int, default=0, help="seed of weights, norm statistics and images (default 0)")
    p.add_argument("--json", metavar="PATH", help="write every number to this JSON file")
    p.add_argument("--report", "--plot", metavar="PATH", dest="report",
                   help="write a PNG report: speed-up bars and, detector job, per photo (the first four) its "
                        "pyramid levels as heat maps and, with --weights, the detections of torchvision and fpn_fast")
    args = p.parse_args(argv)

    detector = args.model != "backbone"
    defaults = {"size": None, "channels_last": False, "optimize": False, "images": None, "weights": None,
                "num_classes": None, "model_args": [], "min_size": None, "max_size": None}
    for name in _BACKBONE_ONLY if detector else _DETECTOR_ONLY:
        if getattr(args, name) != defaults[name]:
            flag = "model-arg" if name == "model_args" else name.replace("_", "-")
            p.error(f"--{flag} is not an option of --model {args.model}")
    args.model_args = dict(args.model_args)
    reserved = sorted(set(args.model_args) & set(_RESERVED_MODEL_ARGS))
    if reserved:
        p.error(f"--model-arg {reserved[0]}: set by the job or by its own option")
    if detector and args.backend == "all":
        p.error("--backend all is an option of --model backbone; a detector runs one backend")
    try:
        args.device = torch.device(args.device)
    except RuntimeError as err:
        p.error(f"--device: {err}")
    if args.device.type not in ("cpu", "cuda"):
        p.error(f"--device must be cpu or cuda, not {args.device}")
    if args.device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU is available")
    if args.compile and torchvision is None:
        p.error("--compile compiles torchvision's model: torchvision is not installed")
    if detector and torchvision is None:
        p.error(f"--model {args.model} needs torchvision (pip install torchvision)")
    for option in ("json", "report"):
        folder = os.path.dirname(os.path.abspath(getattr(args, option))) if getattr(args, option) else None
        if folder and not os.path.isdir(folder):
            p.error(f"--{option}: folder {folder} does not exist")

    on_gpu = args.device.type == "cuda"
    if detector:
        args.batch = args.batch or 1
        args.min_size = args.min_size or 800
        args.max_size = args.max_size or 1333
        args.backend = args.backend or "auto"
        # On CPU a pass costs seconds per photo and row (benchmarks/RESULTS.md): 2 passes keep `make demo` to minutes.
        args.repeats = args.repeats or (10 if on_gpu else 2)
        args.warmup = (2 if on_gpu else 0) if args.warmup is None else args.warmup
    else:
        args.batch = args.batch or 2
        args.size = args.size or (800, 1216)
        args.backend = args.backend or "all"
        # On CPU a run of the default-size backbone costs seconds (benchmarks/RESULTS.md): 3 runs keep the job
        # to minutes.
        args.repeats = args.repeats or (20 if on_gpu else 3)
        args.warmup = (5 if on_gpu else 1) if args.warmup is None else args.warmup
    return args


def _job(cls, args: argparse.Namespace):
    """The dataclass ``cls`` filled from the options of the same names."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})


def main(argv: Optional[List[str]] = None) -> int:
    """Run the job the command line asks for and print its report.

    Args:
        argv: the arguments (``sys.argv[1:]`` when None).

    Returns:
        The exit status: 0, 1 when a variant failed or broke the parity bound, 2 when an input
        (path, image, checkpoint, backend) cannot be used; the reason is one line on stderr.
    """
    args = parse_args(argv)
    try:
        if args.model == "backbone":
            result, pictures = run_backbone(_job(BackboneJob, args)), None
        else:
            result, pictures = run_detector(_job(DetectorJob, args))
    except InputError as err:
        print(f"fpn-fast: error: {err}", file=sys.stderr)
        return 2
    if pictures is None:
        report.print_backbone(result)
    else:
        report.print_detector(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}")
    if args.report and pictures is not None:
        report.write_detector_png(result, pictures, args.report)
        print(f"wrote {args.report}")
    elif args.report and result["speedup_baseline"]:
        report.write_backbone_png(result, args.report)
        print(f"wrote {args.report}")
    elif args.report:
        print("no report written: no baseline variant ran", file=sys.stderr)
    return 1 if result["failures"] else 0

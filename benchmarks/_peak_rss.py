"""Child process of test_bench_memory: peak RSS growth (MiB) of one FPN neck forward on CPU.

Usage: python _peak_rss.py VARIANT FORMAT, VARIANT 'torchvision eager' or 'fpn_fast <backend>'.
The peak (VmHWM) is reset through /proc/self/clear_refs after the inputs exist, so the number is
what the forward itself adds on top of the inputs and weights (outputs included).
"""
import sys

import torch

from _bench import FORMATS, build_fpns, neck_features
from fpn_fast import ops


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def main(variant: str, fmt: str) -> None:
    ours, theirs = build_fpns("cpu", FORMATS[fmt])
    features = neck_features("cpu", torch.float32, FORMATS[fmt])
    module = theirs if variant == "torchvision eager" else ours
    backend = "torch" if variant == "torchvision eager" else variant.split()[1]
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    before = _status_kib("VmRSS")
    with torch.inference_mode(), ops.use_backend(backend):
        out = module(features)
    peak = _status_kib("VmHWM")
    del out
    print(f"{(peak - before) / 1024:.1f}")


if __name__ == "__main__":
    main(*sys.argv[1:])

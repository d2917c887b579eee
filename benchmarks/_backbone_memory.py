"""Child process of test_bench_memory: what a whole ResNet-FPN backbone holds on CPU, torchvision's
against fpn_fast's optimized one, with the knobs that trade memory for speed.

Usage: python _backbone_memory.py BACKBONE VARIANT SIZES
  BACKBONE: resnet18 | resnet50. VARIANT: 'torchvision eager' or 'optimized' followed by options:
  'optimized', 'optimized winograd=False', 'optimized pool=0', ... (pool=MB sets
  fpn_fast.ops.set_cpu_cache_limit before the first call; FPN_FAST_CPU_POOL_MB does the same).
  SIZES: HxW of the batch-1 images, one or more separated by commas ('320x320,800x1216': a
  process that serves both sizes, two calls each, in that order).
Prints one JSON line:
  weights_mib: the model's parameters and buffers (the optimized copy's alone: the original is freed);
  peak_mib:    peak RSS growth over the first two calls per size (VmHWM reset after the model and
               images exist);
  held_mib:    RSS growth that stays after them (outputs freed): packs, the buffer pool, plans,
               and what glibc keeps of freed activations;
  pool_mib:    the buffer pool's cached bytes after the calls (fpn_fast.ops.cpu_cache_stats);
  winograd_mib, nnpack_mib: the Winograd / NNPACK kernel transforms the folded convolutions hold;
  onednn_mib:  oneDNN's prepacked weights, counted as numel x element size (their blocked layout
               may pad a little more);
  call_ms:     the median of three further calls at the last size (timed on a shared machine:
               indicative only).
"""
import gc
import json
import sys
import time

import torch

import fpn_fast
from fpn_fast import ops
from fpn_fast.demo import randomize_norms
from fpn_fast.inference import Conv2dAct

SEED = 0


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def _mib(tensors) -> float:
    return sum(t.numel() * t.element_size() for t in tensors) / 2 ** 20


def _pack_mib(model: torch.nn.Module) -> dict:
    """Bytes of the packs the folded convolutions hold, by kind (Conv2dAct's pack cache)."""
    winograd, nnpack, onednn = [], [], []
    for module in model.modules():
        if not isinstance(module, Conv2dAct):
            continue
        cache = module._pack_cache()
        if "_winograd_weight" in cache:
            winograd.extend(cache["_winograd_weight"][2].values())
        if "_nnpack_weight" in cache:
            nnpack.extend(cache["_nnpack_weight"][2])
        if "_onednn_weight" in cache:
            onednn.append(cache["_onednn_weight"][1])
    return dict(winograd_mib=_mib(winograd), nnpack_mib=_mib(nnpack), onednn_mib=_mib(onednn))


def main(backbone: str, variant: str, sizes: str) -> None:
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    words = variant.split()
    options = dict(word.split("=") for word in words[1:]) if words[0] == "optimized" else {}
    if "pool" in options:
        ops.set_cpu_cache_limit(int(options.pop("pool")))
    torch.manual_seed(SEED)
    model = resnet_fpn_backbone(backbone_name=backbone, weights=None).eval()
    randomize_norms(model, SEED)
    if words[0] == "optimized":
        optimized = fpn_fast.optimize_for_inference(model, winograd=options.pop("winograd", "True") == "True")
        assert not options, f"unknown options {options}"
        del model
        model = optimized
    gc.collect()
    weights = _mib([*model.parameters(), *model.buffers()])
    generator = torch.Generator().manual_seed(SEED)
    images = [torch.randn(1, 3, *map(int, size.split("x")), generator=generator) for size in sizes.split(",")]
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    before = _status_mib("VmRSS")
    with torch.inference_mode():
        for image in images:
            for _ in range(2):  # the first call plans and packs; the second runs the plan
                out = model(image)
                del out
        peak = _status_mib("VmHWM") - before
        held = _status_mib("VmRSS") - before
        times = []
        for _ in range(3):
            start = time.perf_counter()
            out = model(image)
            times.append(time.perf_counter() - start)
            del out
    result = dict(weights_mib=weights, peak_mib=peak, held_mib=held,
                  pool_mib=ops.cpu_cache_stats()["cached_bytes"] / 2 ** 20,
                  call_ms=sorted(times)[1] * 1e3, threads=torch.get_num_threads(),
                  pool_limit_mib=ops.cpu_cache_stats()["limit_bytes"] / 2 ** 20)
    result.update(_pack_mib(model))
    print(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:])

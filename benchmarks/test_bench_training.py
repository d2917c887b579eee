"""Training: one step of ``fpn_fast.resnet_fpn_backbone`` against torchvision's (issue 19: the
drop-in must never cost a training user time).

A step is what a detector's training loop does to its backbone: gradients set to None, forward
(under bfloat16 autocast in the low-precision groups, model weights float32), a loss (the mean of
squares of every pyramid level, in float32), backward. ResNet50, ``trainable_layers=5`` (every
layer trains; the norms are frozen, as torchvision's builder makes them), random weights shared
by both models. Groups per device, dtype and memory format (NCHW, or model and images in
channels_last): GPU batch 2, 3x800x1216; CPU batch 1, 3x320x320; float32 and bfloat16 on both.

On CUDA the bfloat16 groups also print a profile of one step per variant after the tables
(CPU total and the largest CUDA kernels), to say where a difference comes from.
"""
import pytest
import torch

import fpn_fast
from _bench import DEVICES, DTYPES, SUMMARY, autocast_context, images_shape, rounds, run_benchmark

tv_detection = pytest.importorskip("torchvision.models.detection.backbone_utils")

VARIANTS = ["torchvision", "fpn_fast"]
FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
_MODELS = {}
_PROFILED = set()


def _models(device: str, memory_format: torch.memory_format):
    """{variant: backbone} in training mode with the same weights, one (device, format) at a time."""
    key = (device, memory_format)
    if key not in _MODELS:
        _MODELS.clear()
        torch.manual_seed(0)
        ours = fpn_fast.resnet_fpn_backbone(backbone_name="resnet50", weights=None, trainable_layers=5)
        theirs = tv_detection.resnet_fpn_backbone(backbone_name="resnet50", weights=None, trainable_layers=5)
        theirs.load_state_dict(ours.state_dict())
        _MODELS[key] = {name: model.to(device, memory_format=memory_format).train()
                        for name, model in (("torchvision", theirs), ("fpn_fast", ours))}
    return _MODELS[key]


def _step(model, images, device: str, dtype: torch.dtype) -> None:
    for parameter in model.parameters():
        parameter.grad = None
    with autocast_context(device, dtype):
        levels = model(images)
    loss = sum(level.float().square().mean() for level in levels.values())
    loss.backward()


def _profile_lines(name: str, step) -> list:
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=12)
    return [f"--- profile of one training step: {name}"] + table.splitlines()


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("layout", list(FORMATS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_training_step(benchmark, device, dtype, layout, variant):
    shape = images_shape((2, 3, 800, 1216) if device == "cuda" else (1, 3, 320, 320))
    model = _models(device, FORMATS[layout])[variant]
    images = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(
        device, memory_format=FORMATS[layout])
    n, _, h, w = shape
    benchmark.group = f"training step {device} {str(dtype)[6:]} {layout} batch {n} {h}x{w}"
    run_benchmark(benchmark, lambda: _step(model, images, device, dtype), device, rounds(3, 10, device))
    if device == "cuda" and dtype == torch.bfloat16 and (layout, variant) not in _PROFILED:
        _PROFILED.add((layout, variant))
        SUMMARY.extend(_profile_lines(f"{variant} {layout} bfloat16",
                                      lambda: _step(model, images, device, dtype)))

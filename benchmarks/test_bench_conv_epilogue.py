"""Convolutions with their epilogue (bias, residual add, ReLU) written by the conv's own kernel
(issue 28): the Triton GEMM / implicit GEMM (``fpn_fast.ops.conv._triton_gemm.conv1x1_act``,
``_triton_implicit_gemm.conv2d_act``) against today's CUDA route and eager PyTorch.

"conv epilogue" groups: one ResNet50 bottleneck conv at batch 2, 800x1216 (C2..C5), channels_last,
after norm folding (the conv has a bias), per precision: float32 with TF32 (torch's default for
cuDNN convs), float32 without (torch.backends.cudnn.allow_tf32 = False; the Triton kernels
follow the same flag), bfloat16 tensors. Variants:
- "triton gemm": the one Triton kernel, epilogue included (1x1 stride 1: conv1x1_act; other
  windows and strides: conv2d_act);
- "cudnn + triton epilogue": today's route (ops.conv2d_act under "triton" on CUDA): F.conv2d
  without bias, then the in-place Triton bias/residual/ReLU pass (conv._triton_epilogue);
- "eager": eager PyTorch: F.conv2d with bias (cuDNN), + residual, torch.relu (summarize.py's
  baseline);
- "cudnn fused": torch.cudnn_convolution_relu / _add_relu, one cuDNN call (convs ending in ReLU
  only; its ReLU maps NaN to 0, so it is a speed reference, not a route the project may take
  unprobed).
Each variant's output is checked against eager's before timing (within 2e-2 of the output's
scale: a sanity check; accuracy is tests/ops/test_triton_conv_epilogue.py's). extra_info: the
per-call median (wall clock over rotated inputs, synchronised per round: run_benchmark), the
per-call median by CUDA events over the same rotation, TFLOP/s, and % of the copy bandwidth for
the least bytes a call moves (x, weight, residual read; output written).

GPU only: on CPU Triton is its interpreter and cuDNN absent, so the CPU rows run only in the
dry run (FPN_FAST_BENCH_DRY=1, the shapes at an eighth of the size; the numbers mean nothing).
"""
import pytest
import torch
import torch.nn.functional as F

from _bench import DEVICES, DRY, run_benchmark, rotation_count, rounds
from fpn_fast.ops import _triton

BATCH = 2
# name -> (C, H, W, K, window, stride, residual, relu) of ResNet50's bottleneck convs for an
# 800x1216 image: (H, W) is the conv's input map; the 1x1 stride-1 ones first.
CONVS = {
    "C2 conv1 256->64": (256, 200, 304, 64, 1, 1, False, True),
    "C2 conv3 64->256 +res": (64, 200, 304, 256, 1, 1, True, True),
    "C2 downsample 64->256": (64, 200, 304, 256, 1, 1, False, False),
    "C3 conv1 512->128": (512, 100, 152, 128, 1, 1, False, True),
    "C3 conv3 128->512 +res": (128, 100, 152, 512, 1, 1, True, True),
    "C4 conv1 1024->256": (1024, 50, 76, 256, 1, 1, False, True),
    "C4 conv3 256->1024 +res": (256, 50, 76, 1024, 1, 1, True, True),
    "C5 conv1 2048->512": (2048, 25, 38, 512, 1, 1, False, True),
    "C5 conv3 512->2048 +res": (512, 25, 38, 2048, 1, 1, True, True),
    # the implicit GEMM's: 3x3 stride 1 and 2 (padding 1), 1x1 stride-2 downsample projections
    "C2 conv2 3x3 64": (64, 200, 304, 64, 3, 1, False, True),
    "C3 conv2 3x3s2 128": (128, 200, 304, 128, 3, 2, False, True),
    "C3 conv2 3x3 128": (128, 100, 152, 128, 3, 1, False, True),
    "C3 downsample 1x1s2 256->512": (256, 200, 304, 512, 1, 2, False, False),
    "C4 conv2 3x3 256": (256, 50, 76, 256, 3, 1, False, True),
    "C5 conv2 3x3 512": (512, 25, 38, 512, 3, 1, False, True),
    "C5 downsample 1x1s2 1024->2048": (1024, 50, 76, 2048, 1, 2, False, False),
}
if DRY:  # the GPU check's dry run: the same convs at an eighth of the size
    CONVS = {name: (c, -(-h // 8), -(-w // 8), *rest) for name, (c, h, w, *rest) in CONVS.items()}
PRECISIONS = {"float32 tf32": (torch.float32, True), "float32 ieee": (torch.float32, False),
              "bfloat16": (torch.bfloat16, True)}
VARIANTS = ["triton gemm", "cudnn + triton epilogue", "eager", "cudnn fused"]


def _ids(names):
    return [n.replace(" ", "_").replace("->", "-").replace("+", "") for n in names]


def _eager(x, weight, bias, residual, stride, padding, relu):
    out = F.conv2d(x, weight, bias, stride, padding)
    if residual is not None:
        out = out + residual
    return torch.relu(out) if relu else out


def _op(variant: str, device: str, window: int, stride: int, relu: bool):
    """The variant as a function of (x, weight, bias, residual), or a pytest skip saying why not."""
    padding = window // 2
    if variant == "eager":
        return lambda x, w, b, r: _eager(x, w, b, r, stride, padding, relu)
    if variant == "cudnn fused":
        if device != "cuda" or not relu:
            pytest.skip("cuDNN's fused conv + ReLU: CUDA convs ending in ReLU only")
        return lambda x, w, b, r: (torch.cudnn_convolution_relu(x, w, b, [stride] * 2, [padding] * 2, [1, 1], 1)
                                   if r is None else
                                   torch.cudnn_convolution_add_relu(x, w, r, 1.0, b, [stride] * 2, [padding] * 2,
                                                                    [1, 1], 1))
    reason = _triton.unavailable_reason(device)
    if reason is not None:
        pytest.skip(f"{variant}: {reason}")
    if variant == "cudnn + triton epilogue":
        from fpn_fast.ops.conv._triton_epilogue import bias_act_
        return lambda x, w, b, r: bias_act_(F.conv2d(x, w, None, stride, padding), b, r, relu)
    if window == 1 and stride == 1:
        from fpn_fast.ops.conv._triton_gemm import conv1x1_act
        return lambda x, w, b, r: conv1x1_act(x, w, b, r, relu)
    from fpn_fast.ops.conv._triton_implicit_gemm import conv2d_act
    return lambda x, w, b, r: conv2d_act(x, w, b, r, stride, padding, relu)


def _event_ms_per_call(fn, calls: int, n_rounds: int = 10) -> float:
    """Median over rounds of one round's CUDA-event time, per call."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(n_rounds):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return sorted(times)[len(times) // 2]


@pytest.fixture
def cudnn_tf32():
    """Restores torch.backends.cudnn.allow_tf32 after a test that sets it."""
    before = torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cudnn.allow_tf32 = before


@pytest.mark.parametrize("variant", VARIANTS, ids=_ids(VARIANTS))
@pytest.mark.parametrize("precision", list(PRECISIONS), ids=_ids(PRECISIONS))
@pytest.mark.parametrize("conv", list(CONVS), ids=_ids(CONVS))
@pytest.mark.parametrize("device", DEVICES)
def test_conv_epilogue(benchmark, copy_gbps, cudnn_tf32, device, conv, precision, variant):
    if device != "cuda" and not DRY:
        pytest.skip("a GPU benchmark: on CPU only in the dry run (FPN_FAST_BENCH_DRY=1)")
    dtype, tf32 = PRECISIONS[precision]
    if device != "cuda" and dtype != torch.float32:
        pytest.skip("low precision is benchmarked on the GPU only")
    c, h, w, k, window, stride, with_residual, relu = CONVS[conv]
    torch.backends.cudnn.allow_tf32 = tf32
    op = _op(variant, device, window, stride, relu)
    benchmark.group = f"conv epilogue {device} {precision} channels_last {conv} {c}x{h}x{w}"
    cl = torch.channels_last
    padding = window // 2
    p, q = (h + 2 * padding - window) // stride + 1, (w + 2 * padding - window) // stride + 1
    generator = torch.Generator().manual_seed(0)

    def make():
        x = torch.randn(BATCH, c, h, w, generator=generator).to(device, dtype, memory_format=cl)
        residual = (torch.randn(BATCH, k, p, q, generator=generator).to(device, dtype, memory_format=cl)
                    if with_residual else None)
        return x, residual

    # channels_last as optimize_for_inference stores its weights (cuDNN picks its kernel by both formats)
    weight = (torch.randn(k, c, window, window, generator=generator) / (c * window * window) ** 0.5).to(
        device, dtype, memory_format=cl)
    bias = torch.randn(k, generator=generator).to(device, dtype)
    element = torch.finfo(dtype).bits // 8
    x_bytes, out_bytes = BATCH * c * h * w * element, BATCH * k * p * q * element
    bytes_per_call = x_bytes + out_bytes * (2 if with_residual else 1) + (weight.numel() + k) * element
    sets = [make() for _ in range(rotation_count(x_bytes + out_bytes * 2, device))]

    with torch.inference_mode():
        x, residual = sets[0]
        expected = _eager(x, weight, bias, residual, stride, padding, relu).float()
        try:
            got = op(x, weight, bias, residual).float()
        except RuntimeError as error:
            if variant != "cudnn fused":
                raise
            pytest.skip(f"cuDNN's fused call refuses this conv here (a peer, not a route): {error}")
        scale = expected.abs().max().clamp(min=1e-30)
        assert (got - expected).abs().max() <= 2e-2 * scale, f"{variant} disagrees with eager"

    def forward():
        with torch.inference_mode():
            return [op(x, weight, bias, residual) for x, residual in sets]
    run_benchmark(benchmark, forward, device, rounds(3, 50, device), calls_per_round=len(sets),
                  bytes_per_call=bytes_per_call, copy_gbps=copy_gbps)
    per_call_s = benchmark.extra_info["median_per_call_us"] * 1e-6
    if device == "cuda":
        event_ms = _event_ms_per_call(forward, len(sets))
        benchmark.extra_info["event_median_per_call_us"] = event_ms * 1e3
        per_call_s = event_ms * 1e-3
    benchmark.extra_info["tflops"] = 2 * BATCH * p * q * k * c * window * window / per_call_s / 1e12

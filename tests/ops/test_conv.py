"""The convolutions of the inference path under the OpTester (tests/ops/op_tester.py):
``conv2d_act`` (a folded convolution with bias, residual and ReLU fused), ``conv2d_nchw`` (one whose
output is wanted in NCHW) and ``conv1x1`` (the lateral 1x1 convolution), on every backend x device
x dtype x layout against F.conv2d and the tail as eager writes them, each route held to its rounding
in ``selection.ROUNDING`` (the Winograd ones to 1e-4 of the output's largest value, oneDNN's and
the matmul's to a reordered sum, "torch" to the bits).

The samples reach every route of the dispatch rows (test_routes_reached): the extension's Winograd
F(4x4, 3x3) (3x3 stride-1 convs of >= 32 channels over enough 4x4 tiles), NNPACK's (conv2d_nchw's
narrow maps of >= 20x20 pixels; conv2d_act's wide ones with the extension's Winograd turned off),
oneDNN's fused call, the Triton epilogue (CPU tensors under the interpreter) and F.conv2d.
What each route does beyond that (Winograd's batching and packs, NNPACK's two call paths, the
thresholds, non-finite fallbacks with huge values) is tested in test_winograd.py and
test_cpu_inference_paths.py.
"""
from typing import Optional

import pytest
import torch
import torch.nn.functional as F

import fpn_fast.ops as ops
from fpn_fast.ops.reference import memory_format_of
from tests._cases import laid_out
from tests.ops.op_tester import OpTester, Sample

_NO_SCRIPT_FORM = ("inference only: scripted optimized models run F.conv2d and the tail inline "
                   "(fpn_fast/inference/conv.py, fpn_fast/inference/modules.py)")


def conv2d_act_reference(x, weight, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1, *,
                         relu: bool = False, residual: Optional[torch.Tensor] = None):
    """relu?(F.conv2d(x, weight, bias, ...) + residual), as eager writes it."""
    out = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    if residual is not None:
        out = out + residual
    return out.relu() if relu else out


def conv2d_nchw_reference(x, weight, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1):
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups).contiguous()


def _conv_sample(device, dtype, layout, shape, out_channels, kernel=3, stride=(1, 1), padding=(1, 1),
                 dilation=(1, 1), groups=1, bias=True, residual=False, relu=None, name="", **options) -> Sample:
    """Fresh random x (in ``layout``), weight scaled so that outputs are of order 1, bias and
    residual (laid out like the output) for F.conv2d's arguments."""
    n, c, h, w = shape
    x = laid_out(torch.randn(shape, device=device).to(dtype), layout)
    weight = (torch.randn(out_channels, c // groups, kernel, kernel, device=device)
              / (kernel * kernel * c / groups) ** 0.5).to(dtype)
    b = torch.randn(out_channels, device=device).to(dtype) if bias else None
    args = (x, weight, b, stride, padding, dilation, groups)
    kwargs = {}
    if relu is not None:
        kwargs["relu"] = relu
    if residual:
        out_shape = F.conv2d(torch.empty(shape, device="meta"), weight.to("meta"), None, stride, padding, dilation,
                             groups).shape
        kwargs["residual"] = laid_out(torch.randn(out_shape, device=device).to(dtype), layout)
    label = f"{'x'.join(map(str, shape))}->{out_channels} {kernel}x{kernel} s{stride[0]} p{padding} {layout}"
    return Sample(args, kwargs, name=f"{name} {label}".strip(), **options)


class TestConv2dAct(OpTester):
    op = "conv2d_act"
    function = ops.conv2d_act
    reference = conv2d_act_reference
    no_script_form = _NO_SCRIPT_FORM
    registered = {"triton": ("fpn_fast_triton::bias_act_",)}
    # The CUDA row's measured-only routes: taken where measurement finds them fastest (and
    # agreeing), never by the unmeasured resolution these samples go through. Their kernels are
    # held to the reference in tests/ops/test_triton_conv_epilogue.py (interpreter and CUDA), their
    # routes in tests/inference/test_triton_conv_routes.py and test_routes.py.
    unreached = {name: "taken only where conv2d_act's CUDA row measures it fastest"
                 for name in ("cudnn_relu", "triton_gemm", "triton_conv")}

    def samples(self, device, dtype, layout):
        make = lambda *args, **kwargs: _conv_sample(device, dtype, layout, *args, **kwargs)  # noqa: E731
        samples = [
            make((1, 40, 23, 21), 33, residual=True, relu=True, name="Winograd"),
            make((2, 5, 9, 13), 6, stride=(2, 2), relu=True, name="odd, stride 2"),
            make((0, 8, 5, 7), 4, relu=True, name="batch 0"),
            make((1, 8, 1, 1), 4, residual=True, relu=True, name="1x1 map"),
            make((2, 6, 7, 11), 9, kernel=1, padding=(0, 0), bias=False, residual=True, name="1x1 conv"),
            make((2, 8, 9, 10), 8, padding=(2, 2), dilation=(2, 2), groups=2, name="groups, dilation"),
        ]
        if dtype == torch.float32:  # more of what only float32 takes: the Winograd routes' variants
            samples += [
                make((1, 64, 21, 19), 48, padding=(1, 0), relu=False, name="Winograd, padding (1, 0)"),
                make((2, 64, 21, 19), 96, relu=True, name="Winograd, ReLU in the output transform"),
                make((1, 128, 20, 21), 40, residual=True, relu=True, name="NNPACK", without=("winograd",)),
                make((1, 128, 110, 95), 4, bias=False, name="NNPACK, torch's call", without=("winograd",),
                     interpreter=False),
            ]
        return samples

    def implementation(self, sample, device):
        x, weight, bias, stride, padding, dilation, _ = sample.args
        relu, residual = sample.kwargs.get("relu", False), sample.kwargs.get("residual")
        return ops.resolve("conv2d_act", device, lambda impl: ops.conv.conv2d_act_supports(
            impl, x, weight, bias, stride, padding, dilation, relu, residual))

    def opcheck_calls(self, implementation, sample):
        x, weight, bias, stride, padding, dilation, groups = sample.args
        out = F.conv2d(x, weight, None, stride, padding, dilation, groups)  # what the epilogue finishes
        return [("fpn_fast_triton::bias_act_", (out, bias, sample.kwargs.get("residual"),
                                                sample.kwargs.get("relu", False)))]


class TestConv2dNchw(OpTester):
    op = "conv2d_nchw"
    function = ops.conv2d_nchw
    reference = conv2d_nchw_reference
    no_script_form = _NO_SCRIPT_FORM
    unreached = {"triton_conv": "taken only where conv2d_nchw's CUDA row measures it fastest"}

    def samples(self, device, dtype, layout):
        make = lambda *args, **kwargs: _conv_sample(device, dtype, layout, *args, **kwargs)  # noqa: E731
        # Both sides of NNPACK's size threshold (20x20 pixels with the extension) and of its sliced
        # path's (100x100), channel counts on both sides of the extension's Winograd's (32).
        samples = [
            make((1, 40, 23, 21), 33, name="Winograd"),
            make((1, 16, 33, 35), 24, padding=(0, 0), bias=False, name="NNPACK"),
            make((1, 5, 19, 21), 6, padding=(1, 0), name="under NNPACK's size"),
            make((0, 8, 5, 7), 4, name="batch 0"),
            make((2, 64, 9, 13), 48, name="too few tiles for Winograd"),
            make((1, 8, 1, 1), 4, name="1x1 map"),
            make((2, 5, 9, 13), 6, stride=(2, 2), bias=False, name="odd, stride 2"),
            make((2, 6, 7, 11), 9, kernel=1, padding=(0, 0), name="1x1 conv"),
        ]
        if dtype == torch.float32:  # more of what only float32 takes: NNPACK's variants
            samples += [
                make((2, 8, 40, 41), 5, padding=(1, 0), bias=False, name="NNPACK, batch 2"),
                make((1, 4, 101, 103), 3, name="NNPACK, torch's call"),
            ]
        return samples

    def implementation(self, sample, device):
        return ops.conv.conv2d_nchw_implementation(*sample.args)

    def output_format(self, sample):
        return torch.contiguous_format


def conv1x1_reference(x, weight, channels_last=False):
    out = F.conv2d(x, weight)
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out


class TestConv1x1(OpTester):
    op = "conv1x1"  # no dispatch rows: its one route is "torch" (a matmul for plain CPU maps)
    function = ops.conv1x1
    reference = conv1x1_reference
    backends = ("torch",)
    differentiable = True
    no_script_form = "the scripted inference FPN runs F.conv2d for its laterals (fpn_fast/inference/modules.py)"

    def samples(self, device, dtype, layout):
        samples = []
        for k, (shape, out_channels) in enumerate([((2, 16, 9, 13), 8), ((0, 4, 3, 3), 2), ((1, 3, 1, 1), 5),
                                                   ((2, 7, 5, 3), 6), ((1, 70, 33, 65), 6)]):
            x = laid_out(torch.randn(shape, device=device).to(dtype), layout)
            weight = (torch.randn(out_channels, shape[1], 1, 1, device=device) / shape[1] ** 0.5).to(dtype)
            channels_last = k % 2 == 1
            samples.append(Sample((x, weight, channels_last), name=f"{'x'.join(map(str, shape))}->{out_channels} "
                                  f"{layout}{' to channels_last' if channels_last else ''}"))
        return samples

    def implementation(self, sample, device):
        return "torch"

    def output_format(self, sample):
        x, _, channels_last = sample.args
        return torch.channels_last if channels_last else memory_format_of(x)

    def test_keeps_the_convolution_under_autograd(self, device):
        x = torch.randn(2, 6, 5, 7, device=device, requires_grad=True)
        weight = torch.randn(4, 6, 1, 1, device=device, requires_grad=True)
        out = ops.conv1x1(x, weight)
        assert torch.equal(out, F.conv2d(x, weight))
        assert "Convolution" in type(out.grad_fn).__name__


@pytest.mark.parametrize("op", [ops.conv2d_act, ops.conv2d_nchw])
def test_conv_refuses_what_conv2d_refuses(op):
    """Calls F.conv2d would refuse are taken by no fast route: they fail with F.conv2d's error."""
    x = torch.randn(1, 64, 30, 30).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(48, 64, 3, 3)
    with torch.no_grad():
        with pytest.raises(RuntimeError, match="channels"):
            op(x, weight[:, :48], None, (1, 1), (1, 1))
        with pytest.raises(RuntimeError, match="negative padding"):
            op(x, weight, None, (1, 1), (-1, 1))

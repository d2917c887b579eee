"""The one case list for the FPN ops (upsample_add, stride2_pool) on every backend, device,
dtype and layout, and the helpers that build inputs from it (tests/ops/op_tester.py's samples)."""
import contextlib
from typing import Iterator, Optional, Tuple

import pytest
import torch

from fpn_fast import ops
from fpn_fast.ops import dispatch

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
BACKENDS = ("extension", "triton", "torch")

# (lateral N, C, H, W), (top H, W): odd sizes, non-2x ratios, exact 2x, equal sizes, top larger
# than lateral, 1x1 maps, batch 0, empty channels, an empty lateral plane.
SHAPES = [
    ((2, 3, 25, 38), (13, 19)),
    ((2, 3, 7, 11), (4, 6)),
    ((2, 3, 8, 10), (4, 5)),
    ((1, 2, 1, 1), (1, 1)),
    ((1, 4, 9, 13), (9, 13)),
    ((2, 3, 9, 13), (5, 7)),
    ((2, 3, 5, 7), (9, 13)),
    ((1, 5, 3, 1), (2, 1)),
    ((1, 3, 6, 9), (1, 1)),
    ((0, 3, 9, 13), (5, 7)),
    ((2, 0, 9, 13), (5, 7)),
    ((1, 3, 0, 5), (2, 3)),
    ((1, 2, 46, 69), (14, 21)),  # float32 scale: floorf(dst * scale) != dst * in // out at 23, 46
]
# The Triton interpreter pays per program: a representative subset runs it on every dtype and
# layout (odd non-2x, exact 2x, 1x1, top larger, batch 0, empty channels, the float32-scale case).
TRITON_SHAPES = [SHAPES[i] for i in (0, 2, 3, 6, 9, 10, 12)]

# Layout name -> (lateral's, top's): "sliced" is a view into a larger tensor, neither layout;
# "mixed" reads a contiguous top into a channels_last lateral.
LAYOUTS = {
    "contiguous": ("contiguous", "contiguous"),
    "channels_last": ("channels_last", "channels_last"),
    "sliced": ("sliced", "sliced"),
    "mixed": ("channels_last", "contiguous"),
}


def shape_id(case) -> str:
    (n, c, h, w), (th, tw) = case
    return f"{n}x{c}x{h}x{w}<-{th}x{tw}"


def require(backend: str, device: str) -> None:
    """Skip unless ``backend`` runs on ``device`` tensors here (test_extension/test_triton fail
    loudly when a backend that should be there is not)."""
    reason = ops.available_backends()[backend][device]
    if reason is not None:
        pytest.skip(f"backend {backend!r} cannot run on {device}: {reason}")


@contextlib.contextmanager
def running(op: str, backend: str, device: str) -> Iterator[None]:
    """``use_backend(backend)`` for ``op`` on ``device`` tensors (skips where the backend cannot
    run), after checking that the dispatch table sends the op to what the backend names for it."""
    require(backend, device)
    with ops.use_backend(backend):
        assert dispatch.resolve(op, device) == dispatch.TABLE[(op, device)][backend][0]
        yield


def laid_out(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as t, as a contiguous, channels_last, or sliced tensor: a view into a
    larger one (every other column of a window), neither layout (unless empty). 1-D tensors (a
    bias) are sliced every other element."""
    if layout == "contiguous":
        return t.contiguous()
    if t.dim() == 1:
        if layout == "channels_last":
            return t.contiguous()
        big = torch.randn(2 * t.shape[0], dtype=t.dtype, device=t.device)
        big[::2] = t
        return big[::2]
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    n, c, h, w = t.shape
    big = torch.randn(n, c, h + 3, 2 * w + 5, dtype=t.dtype, device=t.device)
    view = big[:, :, 1:1 + h, 2:2 + 2 * w:2]  # no unit stride either
    view.copy_(t)
    assert view.numel() == 0 or (not view.is_contiguous()
                                 and not view.is_contiguous(memory_format=torch.channels_last))
    return view


def make_inputs(case, dtype, layout: str = "contiguous", bias: bool = True, device: str = "cpu",
                requires_grad: bool = False) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Fresh random (lateral, top, bias) for a SHAPES case, laid out as LAYOUTS[layout] (a sliced
    layout also slices the bias); leaves that require grad when asked."""
    (n, c, h, w), (th, tw) = case
    lateral_layout, top_layout = LAYOUTS[layout]
    lateral = laid_out(torch.randn(n, c, h, w, device=device).to(dtype), lateral_layout)
    top = laid_out(torch.randn(n, c, th, tw, device=device).to(dtype), top_layout)
    b = laid_out(torch.randn(c, device=device).to(dtype), lateral_layout) if bias else None
    if requires_grad:
        for t in (lateral, top, b):
            if t is not None:
                t.requires_grad_()
    return lateral, top, b

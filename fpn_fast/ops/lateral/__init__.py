"""The FPN's whole top-down step from a body feature map, for inference: the lateral 1x1
convolution, its bias and the coarser pyramid level's nearest upsample in one op.

``lateral_upsample_add(x, weight, bias, top)`` -> upsample_add(conv1x1(x, weight), top, bias)

Implementations: on CUDA one Triton GEMM whose epilogue does the top-down step, so the lateral
map is never stored (``_triton.py``), measured under "auto" (``ops.measure``) against the
unfused route; elsewhere ("torch") the convolution, then the top-down step (``top_down.step``)
written into its output.
"""
import functools
from typing import Optional

import torch

from .. import _checks
from .._triton import on_device_of
from ..conv import conv1x1_route
from ..conv import runner as conv_runner
from ..dispatch import autocast_dtype, cached, candidates, capturing_graph, declare, get_backend, resolve, row, tensor_key
from ..casts import cast_once
from ..measure import cuda_flags, fastest, measured, stream_capturing
from ..runner import Runner
from ..top_down import runner as top_down_runner
from ..top_down import step
from . import _triton

__all__ = ["lateral_upsample_add", "runner"]

ROWS = {
    ("lateral_upsample_add", "cpu"): row(("torch",), extension=("torch",)),
    ("lateral_upsample_add", "cuda"): row(("triton", "torch"), extension=("torch",)),
}
declare(ROWS, measured=[("lateral_upsample_add", "cuda")])


def lateral_supports(implementation: str, dtype: torch.dtype, fuse: bool) -> bool:
    """Whether ``implementation`` takes a call whose operands are (after autocast's casts) of
    ``dtype``: the fused GEMM only when asked for and for its dtypes (float64 takes the unfused
    path). The GEMM sums in its own order (TF32 for float32 where cuDNN may use it), so it
    rounds apart from the unfused path (``selection.ROUNDING``)."""
    return implementation != "triton" or (fuse and dtype in _triton.SUPPORTED_DTYPES)


def _cast(t: Optional[torch.Tensor], low: Optional[torch.dtype]) -> Optional[torch.Tensor]:
    """t cast as autocast casts a convolution's operands: float32 ones only."""
    return t.to(low) if t is not None and low is not None and t.dtype == torch.float32 else t


def runner(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
           top: Optional[torch.Tensor] = None, fuse: bool = True) -> Runner:
    """``lateral_upsample_add``'s runner for this call's signature: ``run(x, weight, bias, top)``
    (which casts float32 operands under autocast itself). Decided once per signature; on CUDA
    under "auto", the fused GEMM is measured against the unfused route on these tensors."""
    if capturing_graph():
        return _decide(x, weight, bias, top, fuse)
    device = x.device
    state = (get_backend(), autocast_dtype(device.type))
    if device.type == "cuda":
        state += (cuda_flags(), stream_capturing(device))
    key = ("lateral_upsample_add", tensor_key(x), tensor_key(weight), tensor_key(bias), tensor_key(top), fuse, state)
    return cached(key, lambda: _decide(x, weight, bias, top, fuse))


def _decide(x, weight, bias, top, fuse) -> Runner:
    low = autocast_dtype(x.device.type)
    dtype = low if low is not None and x.dtype == torch.float32 else x.dtype
    routes = {"triton": lambda: _fused(low), "torch": lambda: _unfused(_cast(x, low), _cast(weight, low), low)}
    def supports(implementation: str) -> bool:
        return lateral_supports(implementation, dtype, fuse)
    if not measured("lateral_upsample_add", x.device):
        implementation = resolve("lateral_upsample_add", x.device.type, supports)
        return Runner("lateral_upsample_add", implementation, routes[implementation](), dynamic=(0, 3))
    names, refused = candidates("lateral_upsample_add", x.device.type, supports,
                                lambda impl: "not fused (fuse=False)" if not fuse else f"no GEMM for {dtype}")
    fns = {name: routes[name]() for name in names}
    signature = (f"x {list(x.shape)} {x.dtype} strides {x.stride()}, weight {list(weight.shape)}, "
                 f"bias {bias is not None}, top {None if top is None else list(top.shape)}, autocast {low}, "
                 f"flags {cuda_flags()}, {x.device}")
    decision = fastest("lateral_upsample_add", signature,
                       {name: functools.partial(fn, x, weight, bias, top) for name, fn in fns.items()},
                       refused, x.device)
    return Runner("lateral_upsample_add", decision.chosen, fns[decision.chosen], dynamic=(0, 3), decision=decision)


def _fused(low: Optional[torch.dtype]):
    """The Triton GEMM with the top-down step in its epilogue."""
    op = torch.ops.fpn_fast_triton.lateral_upsample_add.default

    def run_fused(x, weight, bias=None, top=None):
        return op(_cast(x, low), _cast(weight, low), _cast(bias, low), _cast(top, low))
    return run_fused


def _unfused(x_low: torch.Tensor, weight_low: torch.Tensor, low: Optional[torch.dtype]):
    """The lateral convolution (``conv1x1`` for NCHW maps, else ``conv2d_act``'s direct route),
    then the top-down step written into its fresh output (functional while a graph is captured:
    it may later run with autograd)."""
    if x_low.is_contiguous():
        conv = conv1x1_route(x_low)
    else:
        direct = conv_runner(x_low, weight_low, winograd=False).fn
        conv = lambda x, weight: direct(x, weight, None, None, None)  # noqa: E731
    in_place = not capturing_graph()
    add = top_down_runner(x_low.device.type, in_place=in_place, fresh=True).fn

    def run_unfused(x, weight, bias=None, top=None):
        if low is not None:
            x, weight, bias, top = (_cast(t, low) for t in (x, weight, bias, top))
        return step(conv(x, weight), top, bias, in_place, add)
    return run_unfused


def lateral_upsample_add(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                         top: Optional[torch.Tensor] = None, *, fuse: bool = True) -> torch.Tensor:
    """The FPN's whole top-down step from a body feature map, for inference:
    ``(conv1x1(x, weight) + bias) + nearest_upsample(top, x's H x W)``; no top at the coarsest level.

    With ``fuse`` and Triton in charge (TABLE["lateral_upsample_add", device]; on CUDA under
    "auto" when it measures faster) one GEMM kernel computes the 1x1 convolution and adds bias
    and upsampled top in its epilogue, in x's memory format (float32/float16/bfloat16; float64
    takes the unfused path). Otherwise the convolution (``conv1x1`` for NCHW maps, else
    ``conv2d_act``) writes the lateral map and the top-down step adds bias and top into it.
    Under autocast every float32 input is cast to the autocast dtype first, as the convolution
    it replaces would be.

    Args:
        x: Tensor[N, C, H, W]. weight: Tensor[O, C, 1, 1]. bias: Tensor[O] or None.
        top: Tensor[N, O, th, tw] or None. All of x's dtype and device.
        fuse: allow the fused GEMM.

    Returns:
        Tensor[N, O, H, W] in x's memory format.

    Raises:
        TypeError, ValueError: inputs that do not fit (named in the message).
        RuntimeError: grad mode is on and an input requires grad (there is no backward).
    """
    _checks.check_inference_only("lateral_upsample_add", x, weight, bias, top)
    low = autocast_dtype(x.device.type) if isinstance(x, torch.Tensor) else None
    _checks.check_lateral_upsample_add(x, weight, bias, top, low)
    # Cast here, outside the runner, weight and bias are static arguments: a plan keeps the cast
    # copies instead of casting them on every replay (x and top are cast inside it).
    weight, bias = cast_once(weight, low), cast_once(bias, low)
    run = runner(x, weight, bias, top, fuse)
    if x.is_cuda:
        with on_device_of(x):
            return run(x, weight, bias, top)
    return run(x, weight, bias, top)

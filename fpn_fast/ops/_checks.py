"""Input validation shared by every backend; runs before any kernel is launched.

One exception type per kind of error, as the C++ ops raise them (TORCH_CHECK_TYPE /
TORCH_CHECK_VALUE): a wrong dtype (or a non-tensor) is a TypeError, a wrong shape or device a
ValueError, autograd through an op that has none a RuntimeError.
"""
from typing import Optional

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _describe(t: torch.Tensor) -> str:
    return f"{tuple(t.shape)} {t.dtype} on {t.device}"


def check_upsample_add(lateral: torch.Tensor, top: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
    """Raise TypeError (dtypes, non-tensors) or ValueError (shapes, devices), naming the
    offending inputs, unless lateral/top/bias fit."""
    if not isinstance(lateral, torch.Tensor) or not isinstance(top, torch.Tensor):
        raise TypeError("upsample_add: lateral and top must be tensors")
    if lateral.dim() != 4 or top.dim() != 4:
        raise ValueError(
            f"upsample_add: lateral and top must be 4-D (N, C, H, W); got lateral {tuple(lateral.shape)}, "
            f"top {tuple(top.shape)}")
    if lateral.dtype not in FLOAT_DTYPES:
        raise TypeError(f"upsample_add: floating dtypes only, got lateral {_describe(lateral)}")
    if top.dtype != lateral.dtype:
        raise TypeError(f"upsample_add: top and lateral dtypes differ: lateral {_describe(lateral)}, top {_describe(top)}")
    if top.device != lateral.device:
        raise ValueError(f"upsample_add: top and lateral devices differ: lateral {_describe(lateral)}, top {_describe(top)}")
    if top.shape[0] != lateral.shape[0] or top.shape[1] != lateral.shape[1]:
        raise ValueError(
            f"upsample_add: top {tuple(top.shape)} must match lateral {tuple(lateral.shape)} in N and C")
    if (top.shape[2] == 0 or top.shape[3] == 0) and lateral.shape[2] * lateral.shape[3] > 0:
        raise ValueError(
            f"upsample_add: top has an empty plane {tuple(top.shape)}, nothing to upsample to lateral {tuple(lateral.shape)}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError("upsample_add: bias must be a tensor or None")
        if bias.dim() != 1 or bias.shape[0] != lateral.shape[1]:
            raise ValueError(
                f"upsample_add: bias must have shape ({lateral.shape[1]},) for lateral {tuple(lateral.shape)}, "
                f"got {tuple(bias.shape)}")
        if bias.dtype != lateral.dtype:
            raise TypeError(f"upsample_add: bias {_describe(bias)} must have lateral's dtype: {_describe(lateral)}")
        if bias.device != lateral.device:
            raise ValueError(f"upsample_add: bias {_describe(bias)} must be on lateral's device: {_describe(lateral)}")


def check_stride2_pool(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError("stride2_pool: x must be a tensor")
    if x.dim() != 4:
        raise ValueError(f"stride2_pool: x must be 4-D (N, C, H, W), got {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"stride2_pool: floating dtypes only, got {_describe(x)}")


def check_lateral_upsample_add(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                               top: Optional[torch.Tensor], autocast: Optional[torch.dtype] = None) -> None:
    """Raise TypeError/ValueError naming the offending shapes, dtypes or devices unless
    (conv1x1(x, weight) + bias) + nearest_upsample(top) fits: weight (O, C, 1, 1) for x (N, C, H, W),
    bias (O,) or None, top (N, O, th, tw) or None, all of x's dtype and device. Under autocast
    (``autocast``: its dtype) float32 tensors count as that dtype, as autocast casts them."""
    def dtype(t: torch.Tensor) -> torch.dtype:
        return autocast if autocast is not None and t.dtype == torch.float32 else t.dtype

    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError("lateral_upsample_add: x and weight must be tensors")
    for name, t in (("bias", bias), ("top", top)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"lateral_upsample_add: {name} must be a tensor or None, got {type(t).__name__}")
    if x.dim() != 4:
        raise ValueError(f"lateral_upsample_add: x must be 4-D (N, C, H, W), got {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"lateral_upsample_add: floating dtypes only, got x {_describe(x)}")
    n, c, h, w = x.shape
    if weight.dim() != 4 or weight.shape[1] != c or weight.shape[2:] != (1, 1):
        raise ValueError(
            f"lateral_upsample_add: weight must be (O, {c}, 1, 1) for x {tuple(x.shape)}, got {tuple(weight.shape)}")
    o = weight.shape[0]
    for name, t in (("weight", weight), ("bias", bias), ("top", top)):
        if t is not None and dtype(t) != dtype(x):
            raise TypeError(f"lateral_upsample_add: {name} {_describe(t)} must have x's dtype: {_describe(x)}")
        if t is not None and t.device != x.device:
            raise ValueError(f"lateral_upsample_add: {name} {_describe(t)} must be on x's device: {_describe(x)}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != o):
        raise ValueError(
            f"lateral_upsample_add: bias must have shape ({o},) for weight {tuple(weight.shape)}, got {tuple(bias.shape)}")
    if top is not None:
        if top.dim() != 4 or top.shape[0] != n or top.shape[1] != o:
            raise ValueError(
                f"lateral_upsample_add: top must be ({n}, {o}, th, tw) for x {tuple(x.shape)} and weight "
                f"{tuple(weight.shape)}, got {tuple(top.shape)}")
        if (top.shape[2] == 0 or top.shape[3] == 0) and h * w > 0:
            raise ValueError(
                f"lateral_upsample_add: top has an empty plane {tuple(top.shape)}, nothing to upsample to x {tuple(x.shape)}")


def _needs_grad(tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def check_in_place(name: str, lateral: torch.Tensor, *others: Optional[torch.Tensor]) -> None:
    """RuntimeError unless ``lateral`` may be written in place: no autograd through the op (it
    has no derivative) and no element of lateral sharing memory with another (an expanded view)."""
    if _needs_grad((lateral, *others)):
        raise RuntimeError(f"fpn_fast.ops.{name} writes into lateral in place and has no gradient, but an input "
                           "requires grad; use the out-of-place op, or run under torch.no_grad() / "
                           "torch.inference_mode()")
    if lateral.numel() > 0 and any(stride == 0 and size > 1 for size, stride in zip(lateral.shape, lateral.stride())):
        raise RuntimeError(f"fpn_fast.ops.{name}: lateral {tuple(lateral.shape)} with strides {lateral.stride()} "
                           "has elements that share memory (an expanded view); clone() it first")


def check_inference_only(name: str, *tensors: Optional[torch.Tensor]) -> None:
    """RuntimeError when grad mode is on and an input requires grad: the op has no backward."""
    if _needs_grad(tensors):
        raise RuntimeError(f"fpn_fast.ops.{name} is for inference only and has no gradient; run it under "
                           "torch.no_grad() or torch.inference_mode(), or use the differentiable ops")

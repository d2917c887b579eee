"""Input validation shared by every backend; runs before any kernel is launched."""
from typing import Optional

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _describe(t: torch.Tensor) -> str:
    return f"{tuple(t.shape)} {t.dtype} on {t.device}"


def check_upsample_add(lateral: torch.Tensor, top: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
    """Raise ValueError naming the offending shapes unless lateral/top/bias fit."""
    if not isinstance(lateral, torch.Tensor) or not isinstance(top, torch.Tensor):
        raise TypeError("upsample_add: lateral and top must be tensors")
    if lateral.dim() != 4 or top.dim() != 4:
        raise ValueError(
            f"upsample_add: lateral and top must be 4-D (N, C, H, W); got lateral {tuple(lateral.shape)}, "
            f"top {tuple(top.shape)}")
    if lateral.dtype not in FLOAT_DTYPES:
        raise ValueError(f"upsample_add: floating dtypes only, got lateral {_describe(lateral)}")
    if top.dtype != lateral.dtype:
        raise ValueError(f"upsample_add: top and lateral dtypes differ: lateral {_describe(lateral)}, top {_describe(top)}")
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
        if bias.dtype != lateral.dtype or bias.device != lateral.device:
            raise ValueError(
                f"upsample_add: bias {_describe(bias)} must match lateral {_describe(lateral)} in dtype and device")


def check_stride2_pool(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError("stride2_pool: x must be a tensor")
    if x.dim() != 4:
        raise ValueError(f"stride2_pool: x must be 4-D (N, C, H, W), got {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"stride2_pool: floating dtypes only, got {_describe(x)}")

"""Pure-PyTorch implementations: the 'torch' backend and the reference every kernel is checked against.

Written so TorchScript compiles them too (scripted fpn_fast modules use them where the
extension cannot run), and so torch.export traces them into ATen ops (``fpn_fast.export.decompositions``).
"""
from typing import List, Optional

import torch
import torch.nn.functional as F


def memory_format_of(t: torch.Tensor):  # -> torch.memory_format (TorchScript has no such annotation)
    """channels_last when t is laid out that way (and not also plainly contiguous), else contiguous."""
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def nearest_source_index(out_size: int, in_size: int) -> torch.Tensor:
    """Source index of each destination index for nearest resize, as PyTorch computes it
    (float32 scale, floor, clamp); the formula every backend implements (docs/design.md, Exact op semantics)."""
    if out_size == in_size:
        return torch.arange(out_size)
    if out_size == 2 * in_size:
        return torch.arange(out_size) // 2
    scale = torch.tensor(in_size, dtype=torch.float32) / torch.tensor(out_size, dtype=torch.float32)
    src = torch.floor(torch.arange(out_size, dtype=torch.float32) * scale).long()
    return src.clamp_(max=in_size - 1)


def nearest_upsample_backward(grad: torch.Tensor, top_h: int, top_w: int) -> torch.Tensor:
    """top's gradient through ``nearest_upsample(top, grad's H x W)`` as the forward map defines
    it: each top element sums grad over the destinations that read it (its window, the preimage
    of ``nearest_source_index``), in destination order row by row, in float32 for float16/bfloat16
    (rounded once), laid out like grad. ATen's CPU backward gives these bits; ATen's CUDA backward
    derives its windows from the reciprocal scale instead and credits some destinations to a
    neighbouring source at non-integer ratios (docs/design.md, exact op semantics).

    Args:
        grad (Tensor[N, C, H, W]): the gradient of the upsampled map, any floating dtype.
        top_h, top_w: top's spatial size (at least 1 each when H x W is not empty).
    Returns:
        Tensor[N, C, top_h, top_w] of grad's dtype and memory format (zeros where no
        destination reads a top element, e.g. when top is larger than grad).
    """
    n, c, h, w = grad.shape
    low_precision = grad.dtype in (torch.float16, torch.bfloat16)
    g = grad.float() if low_precision else grad
    acc = torch.zeros([n, c, top_h, top_w], dtype=g.dtype, device=grad.device)
    # starts[s] .. starts[s + 1] is source s's window: the forward map is non-decreasing.
    starts_h = torch.searchsorted(nearest_source_index(h, top_h), torch.arange(top_h + 1)).to(grad.device)
    starts_w = torch.searchsorted(nearest_source_index(w, top_w), torch.arange(top_w + 1)).to(grad.device)
    span_h = int((starts_h[1:] - starts_h[:-1]).max()) if top_h > 0 else 0
    span_w = int((starts_w[1:] - starts_w[:-1]).max()) if top_w > 0 else 0
    for i in range(span_h):  # window row i, then window column j: destination order
        rows = starts_h[:-1] + i
        rows_in = rows < starts_h[1:]
        g_rows = g.index_select(2, rows.clamp(max=max(h - 1, 0)))
        for j in range(span_w):
            cols = starts_w[:-1] + j
            inside = rows_in.view(-1, 1) & (cols < starts_w[1:]).view(1, -1)
            term = g_rows.index_select(3, cols.clamp(max=max(w - 1, 0)))
            acc = acc + term.masked_fill(~inside, 0.0)  # + 0 leaves a partial sum's bits as they are
    return acc.to(grad.dtype).contiguous(memory_format=memory_format_of(grad))


def _upsampled(top: torch.Tensor, size: List[int]) -> torch.Tensor:
    if top.shape[2] == size[0] and top.shape[3] == size[1]:
        return top
    if size[0] == 0 or size[1] == 0:
        # Nothing to read: an empty map, still connected to top for autograd (a zero gradient).
        return top.new_zeros([top.shape[0], top.shape[1], size[0], size[1]]) + top.sum() * 0
    if top.numel() == 0:
        # F.interpolate refuses empty planes and channels; a gather by the same indices does not
        # (empty maps occur in no FPN, but every backend must agree on them).
        src_h = nearest_source_index(size[0], top.shape[2]).to(top.device)
        src_w = nearest_source_index(size[1], top.shape[3]).to(top.device)
        return top.index_select(2, src_h).index_select(3, src_w)
    return F.interpolate(top, size=[size[0], size[1]], mode="nearest")


def upsample_add(lateral: torch.Tensor, top: torch.Tensor, bias: Optional[torch.Tensor] = None,
                 functional: bool = False) -> torch.Tensor:
    """(lateral + bias[c]) + nearest_upsample(top); low precision computed in float32, rounded once.
    Without autograd the second add goes into the first one's result, unless ``functional``
    (a decomposition must not mutate)."""
    up = _upsampled(top, [lateral.shape[2], lateral.shape[3]])
    fmt = memory_format_of(lateral)
    low_precision = lateral.dtype in (torch.float16, torch.bfloat16)
    acc = lateral.float() if low_precision else lateral
    needs_grad = torch.is_grad_enabled() and (
        lateral.requires_grad or top.requires_grad or (bias is not None and bias.requires_grad))
    if bias is not None:
        acc = acc + (bias.float() if low_precision else bias).view(1, -1, 1, 1)
        if not (needs_grad or low_precision or functional):
            out = acc.add_(up)  # acc is our own temporary: finish in place, one allocation
            return out.contiguous(memory_format=fmt)
    out = acc + (up.float() if low_precision else up)
    return out.to(lateral.dtype).contiguous(memory_format=fmt)


def upsample_add_(lateral: torch.Tensor, top: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """In-place upsample_add: writes the result into lateral and returns it."""
    if lateral.dtype in (torch.float16, torch.bfloat16):
        return lateral.copy_(upsample_add(lateral, top, bias))
    if bias is not None:
        lateral.add_(bias.view(1, -1, 1, 1))
    return lateral.add_(_upsampled(top, [lateral.shape[2], lateral.shape[3]]))


def stride2_pool(x: torch.Tensor) -> torch.Tensor:
    """Every other row and column: F.max_pool2d(x, 1, 2, 0) without the max."""
    return x[:, :, ::2, ::2].clone(memory_format=memory_format_of(x))


def stride2_pool_max_pool(x: torch.Tensor) -> torch.Tensor:
    """torchvision's formulation, kept as the reference stride2_pool is tested against."""
    return F.max_pool2d(x, kernel_size=1, stride=2, padding=0)

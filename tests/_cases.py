"""Shared input matrix for the upsample_add kernels (extension and Triton tests)."""
import torch

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

# (lateral N, C, H, W), (top H, W): odd sizes, non-2x ratios, exact 2x, equal sizes,
# top larger than lateral, 1x1 maps, batch 0.
SHAPES = [
    ((2, 3, 25, 38), (13, 19)),
    ((2, 3, 7, 11), (4, 6)),
    ((2, 3, 8, 10), (4, 5)),
    ((1, 2, 1, 1), (1, 1)),
    ((1, 4, 9, 13), (9, 13)),
    ((2, 3, 9, 13), (5, 7)),
    ((2, 3, 5, 7), (9, 13)),
    ((1, 5, 3, 1), (2, 1)),
    ((0, 3, 9, 13), (5, 7)),
    ((1, 2, 46, 69), (14, 21)),  # float32 scale: floorf(dst * scale) != dst * in // out at 23, 46
]


def shape_id(case):
    (n, c, h, w), (th, tw) = case
    return f"{n}x{c}x{h}x{w}<-{th}x{tw}"


def make_inputs(case, dtype, lateral_cl=False, top_cl=False, bias=True, device="cpu", requires_grad=False):
    (n, c, h, w), (th, tw) = case
    lateral = torch.randn(n, c, h, w, device=device).to(dtype)
    top = torch.randn(n, c, th, tw, device=device).to(dtype)
    if lateral_cl:
        lateral = lateral.to(memory_format=torch.channels_last)
    if top_cl:
        top = top.to(memory_format=torch.channels_last)
    b = torch.randn(c, device=device).to(dtype) if bias else None
    if requires_grad:
        lateral.requires_grad_()
        top.requires_grad_()
        if b is not None:
            b.requires_grad_()
    return lateral, top, b


def laid_out(t, layout):
    """The same values as t, as a contiguous, channels_last, or sliced tensor: a view into a
    larger one, neither layout (unless empty)."""
    if layout == "contiguous":
        return t.contiguous()
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    n, c, h, w = t.shape
    big = torch.randn(n, c, h + 3, w + 5, dtype=t.dtype, device=t.device)
    view = big[:, :, 1:1 + h, 2:2 + w]
    view.copy_(t)
    assert view.numel() == 0 or (not view.is_contiguous()
                                 and not view.is_contiguous(memory_format=torch.channels_last))
    return view

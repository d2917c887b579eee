"""The convolution precision flags the CUDA routes depend on, read one way everywhere (a leaf
module: the measuring policy, ``measure.py``, and the Triton kernels' precision choice,
``_triton.py``, both import it)."""
import torch

__all__ = ["cudnn_conv_allows_tf32"]


def cudnn_conv_allows_tf32() -> bool:
    """torch.backends.cudnn.allow_tf32, also when the caller set the newer per-op precision
    flags (torch >= 2.9), after which reading the legacy flag raises: the most specific of
    cudnn.conv, cudnn, then the global fp32_precision that is not "none" decides."""
    try:
        return torch.backends.cudnn.allow_tf32
    except RuntimeError:
        pass
    for precision in (torch.backends.cudnn.conv.fp32_precision, torch.backends.cudnn.fp32_precision,
                      torch.backends.fp32_precision):
        if precision != "none":
            return precision == "tf32"
    return True  # torch's default for cuDNN convolutions

"""``stride2_pool``'s TorchScript form, for scripted fpn_fast modules: torchvision's own
``max_pool2d(x, 1, 2, 0)``, which every TorchScript runtime has."""
import torch
from torch import Tensor

__all__ = ["stride2_pool"]


def stride2_pool(x: Tensor) -> Tensor:
    """``fpn_fast.ops.stride2_pool`` in TorchScript."""
    return torch.nn.functional.max_pool2d(x, 1, 2, 0)

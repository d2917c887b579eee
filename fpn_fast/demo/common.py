"""What every part of the main job shares: the row labels, the dtypes, the user-facing error, and
torchvision when it is installed.

torchvision is optional for the backbone job (its torchvision rows are skipped and the report says
so) and needed by the detector job; ``torchvision`` here is the module, or None without it.
"""
from typing import Dict

import torch

try:
    import torchvision
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone as tv_resnet_fpn_backbone
except ImportError:  # optional for the backbone job: its torchvision rows are skipped and the report says so
    torchvision = tv_resnet_fpn_backbone = None

DTYPES: Dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# The rows (variants) of both jobs, as they are labelled in the report and the JSON.
TORCHVISION = "torchvision eager"
REFERENCE = "torch"  # the fpn_fast backend every other one is compared with in the backbone job
CONVERTED = "fpn_fast converted"  # fpn_fast.convert(copy of the torchvision detector)
OPTIMIZED = "fpn_fast optimized"  # fpn_fast.optimize_for_inference(...)
COMPILED = "torchvision max-autotune"  # torch.compile(torchvision's backbone, mode="max-autotune")


class InputError(ValueError):
    """A path, image or checkpoint the job cannot use; the message is one line for the user."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message, for one-line errors.

    Args:
        err: any exception.

    Returns:
        Its message's first line, or its type's name when the message is empty.
    """
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__

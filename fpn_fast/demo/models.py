"""The main job's models: fpn_fast's and torchvision's ResNet50-FPN backbones with the same seeded
weights, torchvision detectors with seeded random weights and norm statistics, and local
checkpoints loaded into them strictly. Nothing is downloaded."""
import inspect
import os
from typing import Dict, List, Optional

import torch
from torch import Tensor, nn

import fpn_fast

from .common import InputError, first_line, torchvision, tv_resnet_fpn_backbone

DETECTORS = ("fasterrcnn_resnet50_fpn", "fasterrcnn_resnet50_fpn_v2", "maskrcnn_resnet50_fpn",
             "keypointrcnn_resnet50_fpn", "retinanet_resnet50_fpn")
# The torchvision detectors that freeze their body's norms when built with weights (all but v2,
# which keeps BatchNorm2d): built the same way here, so their checkpoints load strictly.
_FROZEN_NORM_DETECTORS = tuple(name for name in DETECTORS if not name.endswith("_v2"))


# ---------------------------------------------------------------------------------------------
# Models

def build_models(seed: int, device: torch.device, memory_format: torch.memory_format):
    """The backbone job's models: fpn_fast's ResNet50-FPN backbone and torchvision's with the same
    weights.

    Args:
        seed: seeds the random initialisation.
        device: where the models go.
        memory_format: their parameters' memory format.

    Returns:
        [fpn_fast backbone, torchvision backbone or None without torchvision], both in eval().
    """
    torch.manual_seed(seed)
    ours = fpn_fast.resnet50_fpn_backbone(weights=None)
    theirs = None
    if torchvision is not None:
        theirs = tv_resnet_fpn_backbone(backbone_name="resnet50", weights=None)
        theirs.load_state_dict(ours.state_dict())
    return [m.eval().to(device, memory_format=memory_format) if m is not None else None for m in (ours, theirs)]


def _freeze_norms(module: nn.Module) -> None:
    """Replace every BatchNorm2d below ``module`` by torchvision's FrozenBatchNorm2d, as torchvision's
    builders do when given weights (its random-init builds keep BatchNorm2d)."""
    from torchvision.ops.misc import FrozenBatchNorm2d
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            setattr(module, name, FrozenBatchNorm2d(child.num_features, eps=child.eps))
        else:
            _freeze_norms(child)


def randomize_norms(module: nn.Module, seed: int) -> int:
    """Give every norm below ``module`` random statistics and affine parameters, so that a randomly
    initialised backbone computes features of varied scale per channel instead of identity norms.

    Args:
        module: any module; its BatchNorm2d and FrozenBatchNorm2d (torchvision's or fpn_fast's) change.
        seed: seeds the values.

    Returns:
        The number of norms changed.
    """
    generator = torch.Generator().manual_seed(seed)
    count = 0
    with torch.no_grad():
        for m in module.modules():
            if not all(isinstance(getattr(m, k, None), Tensor) for k in ("weight", "bias", "running_mean",
                                                                         "running_var")):
                continue
            shape = m.running_mean.shape
            m.running_mean.copy_(torch.randn(shape, generator=generator) * 0.1)
            m.running_var.copy_(torch.rand(shape, generator=generator) * 1.5 + 0.5)
            m.weight.copy_(torch.rand(shape, generator=generator) + 0.5)
            m.bias.copy_(torch.randn(shape, generator=generator) * 0.1)
            count += 1
    return count


def build_detector(name: str, *, num_classes: Optional[int] = None, min_size: int = 800, max_size: int = 1333,
                   seed: int = 0, model_args: Optional[Dict[str, object]] = None) -> nn.Module:
    """A torchvision detector with seeded random weights and random norm statistics, in eval().

    Args:
        name: one of ``DETECTORS``.
        num_classes: classes of its heads (torchvision's default for the model when None).
        min_size: its transform's ``min_size`` (shorter image side after resizing).
        max_size: its transform's ``max_size`` (longer side at most).
        seed: seeds every random value.
        model_args: more keyword arguments of the torchvision builder and model, e.g.
            ``box_detections_per_img`` or ``rpn_post_nms_top_n_test`` (R-CNNs), ``detections_per_img``
            (RetinaNet), ``box_score_thresh``.

    Returns:
        The detector; its body's norms are frozen as in torchvision's trained models (all but the
        v2 Faster R-CNN, which keeps BatchNorm2d), so torchvision checkpoints load strictly.

    Raises:
        RuntimeError: torchvision is not installed.
        ValueError: ``name`` is not in ``DETECTORS``.
        InputError: the model does not take one of ``model_args``.
    """
    if torchvision is None:
        raise RuntimeError("the detector job needs torchvision (pip install torchvision)")
    if name not in DETECTORS:
        raise ValueError(f"unknown detector {name!r}; choose from {DETECTORS}")
    kwargs = {"weights": None, "weights_backbone": None, "min_size": min_size, "max_size": max_size}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    torch.manual_seed(seed)
    builder = getattr(torchvision.models.detection, name)
    try:
        model = builder(**kwargs, **(model_args or {}))
    except TypeError as err:  # an argument the model does not take
        raise InputError(f"{name} with model arguments {model_args}: {first_line(err)}") from None
    # The R-CNN transform swallows unknown keyword arguments: name them instead of ignoring them.
    accepted = {p.name for fn in [builder, type(model.transform).__init__] + [c.__init__ for c in type(model).__mro__]
                for p in inspect.signature(fn).parameters.values()
                if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self"}
    unknown = sorted(set(model_args or {}) - accepted)
    if unknown:
        raise InputError(f"{name} takes no argument {unknown[0]!r}")
    if name in _FROZEN_NORM_DETECTORS:
        _freeze_norms(model.backbone.body)
    randomize_norms(model.backbone, seed)
    return model.eval()


def category_names(name: str, num_classes: int) -> Optional[List[str]]:
    """COCO category names of a detector, from torchvision's weights metadata (nothing downloaded).

    Args:
        name: one of ``DETECTORS``.
        num_classes: the detector's class count.

    Returns:
        Names indexed by label, or None when ``num_classes`` is not the COCO weights' count.
    """
    weights = torchvision.models.get_model_weights(name)
    categories = next(iter(weights)).meta.get("categories")
    return list(categories) if categories and len(categories) == num_classes else None


def detector_classes(model: nn.Module) -> int:
    """The class count of a torchvision detector's heads.

    Args:
        model: an R-CNN (``roi_heads``) or a RetinaNet (``head.classification_head``).

    Returns:
        Its number of classes, background included.
    """
    roi_heads = getattr(model, "roi_heads", None)
    if roi_heads is not None:
        return roi_heads.box_predictor.cls_score.out_features
    return model.head.classification_head.num_classes


# ---------------------------------------------------------------------------------------------
# Checkpoints

def _state_dict_of(path: str) -> Dict[str, Tensor]:
    if not os.path.isfile(path):
        raise InputError(f"--weights {path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises many types for a file that is not a checkpoint
        raise InputError(f"--weights {path}: not a PyTorch checkpoint ({first_line(err)})") from None
    for wrapper in ("model", "state_dict"):  # training scripts save {"model": ..., "optimizer": ...}
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise InputError(f"--weights {path}: not a state_dict (a mapping of names to tensors)")
    if all(k.startswith("module.") for k in state):  # saved from DistributedDataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_weights(model: nn.Module, path: str, model_name: str) -> str:
    """Load a local checkpoint into a torchvision detector, strictly.

    Args:
        model: a torchvision detector (``model.backbone.body`` its ResNet).
        path: a ``torch.save``d state_dict (also wrapped as {"model": ...} or {"state_dict": ...}) of
            the whole detector (keys ``backbone.*``, ``rpn.*``/``head.*``, ``roi_heads.*``), of its
            backbone (``body.*``, ``fpn.*``) or of a ResNet classifier (``conv1.*``...; ``fc.*``
            ignored).
        model_name: the detector's name, for messages.

    Returns:
        What the checkpoint held: "detector", "backbone" or "classifier".

    Raises:
        InputError: missing file, not a state_dict, or keys / shapes that do not fit ``model``.
    """
    state = _state_dict_of(path)
    if any(k.startswith("backbone.") for k in state):
        kind, target = "detector", model
    elif any(k.startswith(("body.", "fpn.")) for k in state):
        kind, target = "backbone", model.backbone
    elif "conv1.weight" in state:
        kind, target = "classifier", model.backbone.body
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    else:
        raise InputError(f"--weights {path}: neither a detector, a backbone nor a ResNet classifier state_dict "
                         f"(first key {next(iter(state))!r})")
    expected = target.state_dict()
    # torchvision's frozen norms have no num_batches_tracked; BatchNorm2d checkpoints do
    state = {k: v for k, v in state.items() if k in expected or not k.endswith(".num_batches_tracked")}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k} {list(state[k].shape)} vs {list(v.shape)}" for k, v in expected.items()
                  if k in state and state[k].shape != v.shape]
    problems = [f"{len(keys)} {what} (first: {keys[0]})" for what, keys in
                (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched))
                if keys]
    if problems:
        hint = " (--num-classes?)" if any("predictor" in k or "head" in k for k in mismatched) else ""
        raise InputError(f"--weights {path} ({kind} checkpoint) does not fit {model_name}: "
                         f"{'; '.join(problems)}{hint}")
    target.load_state_dict(state, strict=True)
    return kind

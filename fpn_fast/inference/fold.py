"""Norm folding: frozen (and running-statistics) batch norms folded into the convolutions before
them, ResNet blocks into FoldedResidualBlocks, FPN blocks into Conv2dActs.

Only modules that provably compute conv-then-norm are folded (exact types, nothing attached:
``_fast_path.runs_as_written``); anything else is kept as it is and runs as written.
"""
import functools
from typing import List, Optional

import torch
from torch import nn
from torch.nn.utils import parametrize

from .._fast_path import has_hooks, runs_as_written
from ..backbone import BackboneWithFPN, IntermediateLayerGetter
from ..fpn import FeaturePyramidNetwork
from ..resnet import BasicBlock, Bottleneck, FrozenBatchNorm2d, ResNet
from .folded_conv import Conv2dAct
from .modules import FoldedResidualBlock

__all__ = ["fold_conv_norm", "fold_norms", "fold_fpn_block", "left_alone"]


@functools.lru_cache(maxsize=None)
def _torchvision_classes():
    """torchvision's counterparts of our block, norm and container classes (empty without it)."""
    try:
        from torchvision.models import resnet as tv_resnet
        from torchvision.models._utils import IntermediateLayerGetter as TvGetter
        from torchvision.models.detection.backbone_utils import BackboneWithFPN as TvBackbone
        from torchvision.ops.misc import FrozenBatchNorm2d as TvFrozenBN
    except ImportError:
        return dict(blocks=(), frozen_norms=(), ordered=(), backbones=())
    return dict(blocks=(tv_resnet.Bottleneck, tv_resnet.BasicBlock), frozen_norms=(TvFrozenBN,),
                ordered=(TvGetter, tv_resnet.ResNet), backbones=(TvBackbone,))



def _is_foldable_norm(norm: nn.Module, channels: int) -> bool:
    """An exact frozen / running-statistics batch norm over ``channels``, with nothing attached
    (see _fast_path.runs_as_written): its eval forward is then an affine map we can fold."""
    if runs_as_written(norm, (FrozenBatchNorm2d, *_torchvision_classes()["frozen_norms"])):
        return norm.weight.shape[0] == channels
    if runs_as_written(norm, (nn.BatchNorm2d, nn.SyncBatchNorm)):
        # In eval mode only running statistics make it an affine map of its input.
        return (norm.track_running_stats and norm.running_mean is not None
                and norm.num_features == channels)
    return False


def _attached(module: nn.Module) -> bool:
    """Whether a hook or a parametrization is attached to the module itself."""
    return has_hooks(module) or parametrize.is_parametrized(module)


def left_alone(model: nn.Module) -> List[str]:
    """Paths of the modules optimize_for_inference leaves as they are although their type is
    one it rewrites: subclasses of those types, or modules with hooks or parametrizations."""
    rewritten = (nn.Conv2d, nn.BatchNorm2d, FrozenBatchNorm2d, nn.ReLU, nn.Sequential, Bottleneck, BasicBlock,
                 FeaturePyramidNetwork, BackboneWithFPN, *_torchvision_classes()["blocks"],
                 *_torchvision_classes()["frozen_norms"], *_torchvision_classes()["backbones"])
    return [name or type(model).__name__ for name, module in model.named_modules(remove_duplicate=False)
            if isinstance(module, rewritten) and (_attached(module) or type(module) not in rewritten)
            and not (isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward
                     and not _attached(module))]


def _is_plain_conv(module: nn.Module) -> bool:
    return (runs_as_written(module, nn.Conv2d) and module.padding_mode == "zeros"
            and not isinstance(module.padding, str))


def fold_conv_norm(conv: nn.Conv2d, norm: Optional[nn.Module], relu: bool) -> Conv2dAct:
    """conv followed by norm (None: conv alone) as one Conv2dAct, folded in float64.

    norm(y) = y * scale + shift per channel with scale = gamma / sqrt(var + eps) and
    shift = beta - mean * scale, so conv-then-norm is a convolution with weight * scale and
    bias * scale + shift. Rounding the folded values once to the weight's dtype changes the
    results by float rounding only (a few 1e-6 of each level's scale in float32 over a ResNet50).
    """
    weight = conv.weight.detach().double()
    bias = (conv.bias.detach().double() if conv.bias is not None
            else torch.zeros(weight.shape[0], dtype=torch.float64, device=weight.device))
    if norm is not None:
        gamma = norm.weight.detach().double() if norm.weight is not None else 1.0
        beta = norm.bias.detach().double() if norm.bias is not None else 0.0
        scale = gamma * (norm.running_var.detach().double() + norm.eps).rsqrt()
        shift = beta - norm.running_mean.detach().double() * scale
        weight = weight * scale.view(-1, 1, 1, 1)
        bias = bias * scale + shift
    if norm is None and conv.bias is None:
        folded_bias = None
    else:
        folded_bias = bias.to(conv.weight.dtype)
    return Conv2dAct(weight.to(conv.weight.dtype), folded_bias, conv.stride, conv.padding, conv.dilation,
                     conv.groups, relu)


def fold_fpn_block(block: nn.Module, fold_norm: bool) -> nn.Module:
    """A (conv[, norm]) block as one Conv2dAct when it provably computes conv-then-norm
    (a Sequential's forward, nothing attached); anything else is kept as it is."""
    if not (isinstance(block, nn.Sequential) and type(block).forward is nn.Sequential.forward
            and not _attached(block) and 1 <= len(block) <= 2):
        return block
    conv = block[0]
    norm = block[1] if len(block) > 1 else None
    if not _is_plain_conv(conv):
        return block
    if norm is None or (fold_norm and _is_foldable_norm(norm, conv.out_channels)):
        return fold_conv_norm(conv, norm, relu=False)
    return block


def _fold_block(block: nn.Module) -> Optional[FoldedResidualBlock]:
    """The folded version of a torchvision-style ResNet block, or None when some part of it
    does not fold (a norm of another kind, an unusual downsample)."""
    depth = 3 if hasattr(block, "conv3") else 2
    if not runs_as_written(block.relu, nn.ReLU):
        return None
    pairs = [(getattr(block, f"conv{k}"), getattr(block, f"bn{k}")) for k in range(1, depth + 1)]
    if not all(_is_plain_conv(conv) and _is_foldable_norm(norm, conv.out_channels) for conv, norm in pairs):
        return None
    downsample = None
    if block.downsample is not None:
        parts = list(block.downsample.children()) if runs_as_written(block.downsample, nn.Sequential) else []
        if not (len(parts) == 2 and _is_plain_conv(parts[0])
                and _is_foldable_norm(parts[1], parts[0].out_channels)):
            return None
        downsample = fold_conv_norm(parts[0], parts[1], relu=False)
    convs = [fold_conv_norm(conv, norm, relu=True) for conv, norm in pairs[:-1]]
    return FoldedResidualBlock(convs, fold_conv_norm(*pairs[-1], relu=True), downsample)


def _runs_children_in_order(module: nn.Module) -> bool:
    """Containers whose forward feeds each child's output to the next one, in registration
    order (so a conv child followed by a norm child is conv-then-norm)."""
    if isinstance(module, nn.Sequential):
        return type(module).forward is nn.Sequential.forward
    return type(module) in (IntermediateLayerGetter, ResNet, *_torchvision_classes()["ordered"])


def fold_norms(module: nn.Module) -> int:
    """Fold, in place, every norm that directly follows a convolution inside ``module``:
    ResNet blocks become FoldedResidualBlocks; in ordered containers (Sequential, the body's
    layer getter, the ResNet stem) a (Conv2d, norm[, ReLU]) run becomes (Conv2dAct, Identity
    [, Identity]). Returns how many norms were folded."""
    blocks = (Bottleneck, BasicBlock, *_torchvision_classes()["blocks"])
    folded = 0
    # _modules, not named_children(): a module registered twice (one ReLU used at two places)
    # must keep both of its places, or the pairs around it would look adjacent.
    children = [(name, child) for name, child in module._modules.items() if child is not None]
    for name, child in children:
        new = _fold_block(child) if runs_as_written(child, blocks) else None
        if new is not None:
            setattr(module, name, new)
            folded += 3 if hasattr(child, "conv3") else 2
            folded += child.downsample is not None
        else:
            folded += fold_norms(child)
    if _runs_children_in_order(module):
        children = [(name, child) for name, child in module._modules.items() if child is not None]
        # A layer getter's returned children must keep their own outputs.
        returned = set(getattr(module, "return_layers", {}))
        for i, (name, child) in enumerate(children[:-1]):
            norm_name, norm = children[i + 1]
            if not (_is_plain_conv(child) and _is_foldable_norm(norm, child.out_channels)) or \
                    {name, norm_name} & returned:
                continue
            relu = (i + 2 < len(children) and runs_as_written(children[i + 2][1], nn.ReLU)
                    and children[i + 2][0] not in returned)
            setattr(module, name, fold_conv_norm(child, norm, relu=relu))
            setattr(module, norm_name, nn.Identity())
            if relu:
                setattr(module, children[i + 2][0], nn.Identity())
            folded += 1
    return folded

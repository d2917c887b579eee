"""When a fast path may stand in for a module call: the one predicate, written once.

A module's call is more than its class's ``forward``: forward (pre-)hooks, backward hooks,
global hooks, parametrizations (``torch.nn.utils.parametrize``, ``spectral_norm``), pruning
(a pre-hook) and subclasses can all change it. So fpn_fast computes a module's work itself
(the FPN's fused lateral conv, ``optimize_for_inference``'s folding) only when the module is of
the exact expected type and nothing is attached to it; anything else runs as written. This is
the pattern of PyTorch's ``nn.MultiheadAttention`` fast path.
"""
from typing import Optional, Tuple, Type, Union

from torch import nn
from torch.nn.modules import module as _module_state
from torch.nn.utils import parametrize

__all__ = ["has_hooks", "runs_as_written", "fusable_lateral_conv"]


def _global_hooks() -> bool:
    """Whether hooks are registered for every module (``register_module_forward_hook``...)."""
    return bool(_module_state._global_forward_hooks or _module_state._global_forward_pre_hooks
                or _module_state._global_backward_hooks or _module_state._global_backward_pre_hooks)


def has_hooks(module: nn.Module) -> bool:
    """Whether calling ``module`` runs anything besides its forward: its own forward or backward
    (pre-)hooks, or hooks registered for every module (``register_module_forward_hook``...).

    Args:
        module: any module.

    Returns:
        True when a hook of any kind would run.
    """
    return _global_hooks() or any(getattr(module, name, None) for name in (
        "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"))


def runs_as_written(module: nn.Module, types: Union[Type[nn.Module], Tuple[Type[nn.Module], ...]]) -> bool:
    """Whether ``module(x)`` is exactly ``types.forward(module, x)`` for one of ``types``: its
    type is one of them (not a subclass), and it has no hooks and no parametrizations.

    Args:
        module: the module a fast path would replace.
        types: the class (or classes) whose forward the fast path reproduces.

    Returns:
        True when a fast path computing that forward gives the module's result.
    """
    types = types if isinstance(types, tuple) else (types,)
    return type(module) in types and not has_hooks(module) and not parametrize.is_parametrized(module)


def fusable_lateral_conv(block: nn.Module) -> Optional[nn.Conv2d]:
    """The convolution of an FPN lateral block when the block is provably one plain 1x1
    convolution: a Sequential (or a subclass that keeps Sequential's forward, like
    torchvision's Conv2dNormActivation) holding exactly one ``nn.Conv2d`` with kernel 1, stride
    1, no padding, dilation 1, groups 1, and no hooks or parametrizations on either.

    Then ``F.conv2d(x, conv.weight)`` plus ``conv.bias`` added later is the block's own
    computation, and the FPN may fuse the bias into its top-down step.

    Args:
        block: an entry of ``FeaturePyramidNetwork.inner_blocks``.

    Returns:
        The conv, or None when the block must be called as a module.
    """
    if not (isinstance(block, nn.Sequential) and type(block).forward is nn.Sequential.forward
            and len(block) == 1 and not has_hooks(block) and not parametrize.is_parametrized(block)):
        return None
    conv = block[0]
    if not runs_as_written(conv, nn.Conv2d):
        return None
    plain = (conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.dilation == (1, 1)
             and conv.groups == 1 and conv.padding in ((0, 0), "valid"))
    return conv if plain else None

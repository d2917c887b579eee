"""Swap torchvision's FPN for ours inside any model (Faster/Mask/Keypoint R-CNN, RetinaNet...)."""
import warnings

from torch import nn

from ._fast_path import runs_as_written
from .fpn import FeaturePyramidNetwork, LastLevelMaxPool

__all__ = ["convert"]

# Per-module hook registries (nn.Module.__init__ creates them); the new FPN shares the old one's,
# so hooks registered on it keep firing and their handles still remove them.
_HOOK_REGISTRIES = ("_backward_pre_hooks", "_backward_hooks", "_forward_hooks", "_forward_hooks_with_kwargs",
                    "_forward_hooks_always_called", "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs",
                    "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
                    "_load_state_dict_post_hooks")


def _from_torchvision(tv_fpn: nn.Module, tv_max_pool: type) -> FeaturePyramidNetwork:
    """Our FPN around tv_fpn's own submodules: the blocks (torchvision's Conv2dNormActivation,
    Sequentials of conv [+ norm]) and their parameters are shared, not copied, so the
    state_dict keys (inner_blocks.<i>.0.weight), training modes and hooks on them stay."""
    fpn = FeaturePyramidNetwork.__new__(FeaturePyramidNetwork)
    nn.Module.__init__(fpn)
    fpn.inner_blocks = tv_fpn.inner_blocks
    fpn.layer_blocks = tv_fpn.layer_blocks
    extra = tv_fpn.extra_blocks
    # Only a plain torchvision LastLevelMaxPool is ours to replace: a subclass or a hooked one
    # may compute something else, so it stays as it is.
    fpn.extra_blocks = LastLevelMaxPool() if extra is not None and runs_as_written(extra, tv_max_pool) else extra
    fpn.training = tv_fpn.training
    for registry in _HOOK_REGISTRIES:
        if hasattr(tv_fpn, registry):
            setattr(fpn, registry, getattr(tv_fpn, registry))
    return fpn


def convert(model: nn.Module) -> nn.Module:
    """Replace every ``torchvision.ops.FeaturePyramidNetwork`` in ``model`` by fpn_fast's.

    The new FPNs hold the old ones' submodules (parameters shared, not copied), training mode
    and hooks; torchvision's ``LastLevelMaxPool`` becomes ours, other extra blocks (e.g.
    RetinaNet's ``LastLevelP6P7``) are kept. Subclasses of torchvision's FPN are left as they are,
    with a warning naming them: their own forward or parameters may differ from the base class.
    fpn_fast's own FPNs (and subclasses of them), which derive from torchvision's for its type
    checks, are already converted: they are left as they are, without a warning.

    Args:
        model: any module (a torchvision detection model, a backbone, or an FPN itself).

    Returns:
        ``model``, converted in place; or the replacement when ``model`` itself is a torchvision
        FPN (like ``nn.SyncBatchNorm.convert_sync_batchnorm``). Without torchvision, ``model``.
    """
    try:
        from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork as TorchvisionFPN
        from torchvision.ops.feature_pyramid_network import LastLevelMaxPool as TorchvisionMaxPool
    except ImportError:  # without torchvision there is nothing of torchvision's to replace
        return model

    def swap(module: nn.Module, path: str) -> nn.Module:
        if type(module) is TorchvisionFPN:
            return _from_torchvision(module, TorchvisionMaxPool)
        # Ours derive from torchvision's FPN too (see _torchvision_compat): already converted.
        if isinstance(module, TorchvisionFPN) and not isinstance(module, FeaturePyramidNetwork):
            warnings.warn(f"fpn_fast.convert: {path or 'the model'} is a {type(module).__qualname__}, a subclass "
                          "of torchvision's FeaturePyramidNetwork; it is left as it is (its forward or "
                          "parameters may differ from the base class)", stacklevel=3)
            return module
        for name, child in module.named_children():
            new_child = swap(child, f"{path}.{name}" if path else name)
            if new_child is not child:
                setattr(module, name, new_child)
        return module

    return swap(model, "")

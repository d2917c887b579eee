"""Swap torchvision's FPN for ours inside any model (Faster/Mask/Keypoint R-CNN, RetinaNet...)."""
from torch import nn

from .fpn import FeaturePyramidNetwork, LastLevelMaxPool

__all__ = ["convert"]


def _from_torchvision(tv_fpn: nn.Module, tv_max_pool: type) -> FeaturePyramidNetwork:
    """Our FPN built around tv_fpn's own conv/norm modules: the parameters are shared, not copied."""
    fpn = FeaturePyramidNetwork.__new__(FeaturePyramidNetwork)
    nn.Module.__init__(fpn)
    # torchvision's blocks are Conv2dNormActivation (a Sequential of conv [+ norm]); regrouping
    # their children in plain Sequentials keeps the keys (inner_blocks.<i>.0.weight) and tensors.
    fpn.inner_blocks = nn.ModuleList(nn.Sequential(*block.children()) for block in tv_fpn.inner_blocks)
    fpn.layer_blocks = nn.ModuleList(nn.Sequential(*block.children()) for block in tv_fpn.layer_blocks)
    extra = tv_fpn.extra_blocks
    # type() rather than isinstance: a subclass may change what the block does, so it stays as is.
    fpn.extra_blocks = LastLevelMaxPool() if extra is not None and type(extra) is tv_max_pool else extra
    # Only the flags of the new containers are set: the shared children keep their own modes.
    fpn.training = tv_fpn.training
    for ours, theirs in zip((*fpn.inner_blocks, *fpn.layer_blocks), (*tv_fpn.inner_blocks, *tv_fpn.layer_blocks)):
        ours.training = theirs.training
    fpn.inner_blocks.training = tv_fpn.inner_blocks.training
    fpn.layer_blocks.training = tv_fpn.layer_blocks.training
    return fpn


def convert(model: nn.Module) -> nn.Module:
    """Replace every ``torchvision.ops.FeaturePyramidNetwork`` in ``model`` by fpn_fast's.

    The new FPNs share the old ones' parameter tensors and training mode; torchvision's
    ``LastLevelMaxPool`` becomes ours, other extra blocks (e.g. RetinaNet's ``LastLevelP6P7``)
    are kept. Works in place and returns the model, or the replacement when ``model`` itself is
    a torchvision FPN (like ``nn.SyncBatchNorm.convert_sync_batchnorm``).
    """
    try:
        from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork as TorchvisionFPN
        from torchvision.ops.feature_pyramid_network import LastLevelMaxPool as TorchvisionMaxPool
    except ImportError:  # without torchvision there is nothing of torchvision's to replace
        return model

    def swap(module: nn.Module) -> nn.Module:
        if isinstance(module, TorchvisionFPN):
            return _from_torchvision(module, TorchvisionMaxPool)
        for name, child in module.named_children():
            new_child = swap(child)
            if new_child is not child:
                setattr(module, name, new_child)
        return module

    return swap(model)

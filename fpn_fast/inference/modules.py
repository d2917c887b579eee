"""The optimized modules around the folded convolutions: ``FoldedResidualBlock`` (a ResNet block
with its norms folded) and ``InferenceFPN`` (the FPN for inference: fused lateral and top-down
steps, output convolutions that write NCHW). The backbone that runs them through the engine is in
``optimized_backbone.py``.
"""
from collections import OrderedDict
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from .._fast_path import runs_as_written
from ..fpn import check_fpn_inputs
from ..ops.layout import to_nchw_scripted
from ..ops.top_down import script as top_down_script
from ..ops.top_down import step as top_down_step
from .folded_conv import Conv2dAct, _check_inference

__all__ = ["FoldedResidualBlock", "InferenceFPN"]



class FoldedResidualBlock(nn.Module):
    """A ResNet block (Bottleneck or BasicBlock) with its norms folded:
    ``last(convs(x), residual=shortcut(x))``, every conv with ReLU, the last one after the add."""

    def __init__(self, convs: List[Conv2dAct], last: Conv2dAct, downsample: Optional[Conv2dAct]):
        super().__init__()
        self.convs = nn.Sequential(*convs)
        self.last = last
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.last(self.convs(x), residual=shortcut)



class InferenceFPN(nn.Module):
    """A FeaturePyramidNetwork for inference: per level, ``lateral_upsample_add`` (the lateral
    1x1 conv and the whole top-down step, fused on GPU) then the 3x3 output conv; the extra
    block; then every output in ``output_memory_format``. Built by ``fold.inference_fpn``.

    Levels whose conv has a norm that is not folded keep the original conv+norm block and
    use the plain fused step (``ops.upsample_add``) after it.

    Args:
        inner_blocks, layer_blocks: per level, a Conv2dAct (folded) or the original block.
        extra_blocks: the FPN's extra block, or None. in_channels_list: as the FPN's.
        fuse_lateral: allow ``ops.lateral_upsample_add``'s fused GEMM.
        output_memory_format: torch.contiguous_format or torch.channels_last.
    """

    __jit_ignored_attributes__ = ["in_channels_list"]  # the eager input check's only

    def __init__(self, inner_blocks: List[nn.Module], layer_blocks: List[nn.Module],
                 extra_blocks: Optional[nn.Module], in_channels_list: List[Optional[int]], *,
                 fuse_lateral: bool = True, output_memory_format: torch.memory_format = torch.contiguous_format):
        super().__init__()
        self.in_channels_list = in_channels_list
        self.inner_blocks = nn.ModuleList(inner_blocks)
        self.layer_blocks = nn.ModuleList(layer_blocks)
        self.extra_blocks = extra_blocks
        self.fuse_lateral = fuse_lateral
        # A bool, not the torch.memory_format (which does not pickle): torch.save must work.
        self.output_channels_last = output_memory_format == torch.channels_last

    @torch.jit.unused
    def _top_down(self, level: int, feature: Tensor, top: Optional[Tensor]) -> Tensor:
        block = self.inner_blocks[level]
        if runs_as_written(block, Conv2dAct):
            return ops.lateral_upsample_add(feature, block.weight, block.bias, top, fuse=self.fuse_lateral)
        # A kept block's output: hooks may hold it, so not in place.
        return top_down_step(block(feature), top, None, False)

    def _top_down_scripted(self, level: int, feature: Tensor, top: Optional[Tensor]) -> Tensor:
        out = feature
        for i, block in enumerate(self.inner_blocks):
            if i == level:
                if hasattr(block, "folded_conv"):  # static in TorchScript: a Conv2dAct
                    out = top_down_script.step(F.conv2d(feature, block.weight), top, block.bias, True)
                else:
                    out = top_down_script.step(block(feature), top, None, False)
        return out

    def forward(self, x: Dict[str, Tensor]) -> Dict[str, Tensor]:
        names = list(x.keys())
        features = list(x.values())
        maps: List[Optional[Tensor]] = [f for f in features]
        _check_inference(self.training, "InferenceFPN", maps)
        if not torch.jit.is_scripting():
            check_fpn_inputs(names, features, self.in_channels_list)
        last = len(features) - 1
        # The whole top-down pathway first, then the output convolutions (independent of each other).
        inners = [self._level(last, features[last], None)]
        for level in range(last - 1, -1, -1):
            inners.insert(0, self._level(level, features[level], inners[0]))
        if torch.jit.is_scripting():
            results: List[Tensor] = []
            for level, inner in enumerate(inners):
                results.append(self._layer(level, inner))
        else:
            results = self._layers_eager(inners)
        if self.extra_blocks is not None:
            results, names = self.extra_blocks(results, features, names)
        out: Dict[str, Tensor] = OrderedDict()
        for name, result in zip(names, results):
            if torch.jit.is_scripting():
                if self.output_channels_last:
                    out[name] = result.contiguous(memory_format=torch.channels_last)
                else:
                    out[name] = to_nchw_scripted(result)
            elif self.output_channels_last:
                out[name] = ops.to_channels_last(result)
            else:
                out[name] = ops.to_nchw(result)
        return out

    @torch.jit.unused
    def _layers_eager(self, inners: List[Tensor]) -> List[Tensor]:
        """Every level's output convolution. With NCHW outputs a folded 3x3 conv runs as
        ``ops.conv2d_nchw`` (a Winograd convolution on CPU maps that writes NCHW). Inputs it takes
        in NCHW (NNPACK's route) are converted first, then the convolutions run from the smallest
        map to the largest, so the largest, where NNPACK runs on its own thread pool (over
        ``selection.NNPACK_SLICED_MAX_PIXELS``; slower while OpenMP's workers still spin after an
        ATen op: benchmarks/RESULTS.md), run back to back. The pyramid levels come finest first
        (ordered by stride), so that is the coarsest level first: an order read from the maps'
        sizes would be a sort on symbolic sizes, which torch.compile cannot trace with dynamic
        shapes."""
        blocks = list(self.layer_blocks)
        direct = [runs_as_written(block, Conv2dAct) and not block.relu and not self.output_channels_last for block in blocks]
        inputs = list(inners)
        for level, block in enumerate(blocks):
            if direct[level] and ops.conv2d_nchw_input_format(
                    inners[level], block.weight, block.bias, block.stride, block.padding, block.dilation,
                    block.groups, winograd=getattr(block, "winograd", True)) == torch.contiguous_format:
                inputs[level] = ops.to_nchw(inners[level])
        results: List[Optional[Tensor]] = [None] * len(blocks)
        for level in range(len(blocks) - 1, -1, -1):
            block = blocks[level]
            if direct[level]:
                results[level] = ops.conv2d_nchw(
                    inputs[level], block.weight, block.bias, block.stride, block.padding, block.dilation,
                    block.groups, packs=block, winograd=getattr(block, "winograd", True))
            else:
                results[level] = block(inners[level])
        return results

    def _level(self, level: int, feature: Tensor, top: Optional[Tensor]) -> Tensor:
        if torch.jit.is_scripting():
            return self._top_down_scripted(level, feature, top)
        return self._top_down(level, feature, top)

    def _layer(self, level: int, inner: Tensor) -> Tensor:
        out = inner
        for i, block in enumerate(self.layer_blocks):  # a loop: TorchScript indexes ModuleLists by constants only
            if i == level:
                out = block(inner)
        return out

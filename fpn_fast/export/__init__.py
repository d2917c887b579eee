"""Deployment helpers built on ``fpn_fast.ops``: the ATen decompositions of the ops
(``decompositions``, for portable ``torch.export`` programs; each op's entries sit beside the op,
as its TorchScript form does: ``ops.top_down.script``, ``ops.pool.script``,
``ops.layout.to_nchw_scripted``). ``fpn_fast.library_path()`` (``fpn_fast.ops``) is the library a
process loads to run programs that keep the fused ops."""
from .aten import decompositions

__all__ = ["decompositions"]

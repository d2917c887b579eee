"""Deployment helpers built on ``fpn_fast.ops``: the ops' TorchScript forms (``script``, used by
the modules' scripted forward) and their ATen decompositions (``decompositions``, for portable
``torch.export`` programs). ``fpn_fast.library_path()`` (``fpn_fast.ops``) is the library a
process loads to run programs that keep the fused ops."""
from . import script
from .aten import decompositions

__all__ = ["decompositions", "script"]

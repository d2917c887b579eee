"""Autocast's casts of the static operands of the inference ops (folded weights and biases),
made once per tensor contents instead of once per call.

Under ``torch.autocast`` a convolution casts its float32 weight and bias to the autocast dtype
on every call. The inference ops (``conv2d_act``, ``conv2d_nchw``, ``lateral_upsample_add``)
take those casts from ``cast_once`` instead: the cast of a tensor is kept, beside the tensor
(weakly keyed: it goes with it), while the tensor's version counter and data pointer are those
it was made from; an in-place write, ``.data =`` or ``set_`` makes the next call cast again. A
plan records the kept cast as a constant (its weight guard rebuilds the plan when the weight
changes), so a replay casts nothing but the image. Inference tensors (they count no writes)
and tensors seen while a graph is traced or a CUDA graph captured are cast per call, as
autocast would.
"""
import threading
import weakref
from typing import Dict, Optional, Tuple

import torch

from .dispatch import capturing_graph

__all__ = ["cast_once", "source_of"]

# id(tensor) -> (a weak reference to it, (dtype, version, data pointer), its cast); an entry goes
# when its tensor does. Keyed by id: a tensor's == is elementwise, so no WeakKeyDictionary.
_CASTS: Dict[int, Tuple[weakref.ref, tuple, torch.Tensor]] = {}
# id(cast) -> id(the tensor it was cast from) (for naming a plan's steps)
_SOURCES: Dict[int, int] = {}
_lock = threading.Lock()


def _forget(key: int) -> None:
    with _lock:
        entry = _CASTS.pop(key, None)
        if entry is not None:
            _SOURCES.pop(id(entry[2]), None)


def cast_once(t: Optional[torch.Tensor], low: Optional[torch.dtype]) -> Optional[torch.Tensor]:
    """``t`` cast to ``low`` as autocast casts a float32 operand (t itself when ``low`` is None or
    t is not float32), the cast kept while t's contents are unchanged.

    Args:
        t: a static operand (a weight or bias), or None. low: the autocast dtype, or None.

    Returns:
        None, t, or a tensor of dtype ``low`` equal to ``t.to(low)`` (the same object on every
        call while t is unchanged).
    """
    if t is None or low is None or t.dtype != torch.float32:
        return t
    if (t.is_inference() or t.requires_grad or capturing_graph()
            or (t.is_cuda and torch.cuda.is_current_stream_capturing())):
        return t.to(low)
    made_from = (low, t._version, t.data_ptr())
    key = id(t)
    entry = _CASTS.get(key)
    if entry is not None and entry[0]() is t and entry[1] == made_from:
        return entry[2]
    cast = t.to(low)
    with _lock:
        old = _CASTS.get(key)
        if old is not None:
            _SOURCES.pop(id(old[2]), None)
        _CASTS[key] = (weakref.ref(t, lambda _, key=key: _forget(key)), made_from, cast)
        _SOURCES[id(cast)] = key
    return cast


def source_of(t: torch.Tensor) -> Optional[torch.Tensor]:
    """The tensor ``t`` is the kept cast of (``cast_once``), or None."""
    key = _SOURCES.get(id(t))
    entry = None if key is None else _CASTS.get(key)
    if entry is None or entry[2] is not t:
        return None
    return entry[0]()

"""The extension's host-side guard (csrc/runtime/host_guard.cpp), which the inference engine's
plans use to skip their Python guards while nothing those read has changed
(fpn_fast/inference/guards.py: ``arm``, ``HostGuard``).
"""
import os
from typing import Callable, NamedTuple, Optional

from . import _extension

__all__ = ["HostGuardFunctions", "functions"]


class HostGuardFunctions(NamedTuple):
    """``_C._guard_arm(structures, called, outer, weights, pointers, dicts) -> record``,
    ``_C._guard_holds(record, outer) -> bool`` and ``_C._guard_mechanism() -> str``; their
    arguments are documented in csrc/runtime/host_guard.cpp."""
    arm: Callable
    holds: Callable
    mechanism: Callable


def functions() -> Optional[HostGuardFunctions]:
    """The host guard's functions, or None where they are not available: the extension is not
    loaded (or predates them), or ``FPN_FAST_HOST_GUARD=0`` turns them off.

    Returns:
        A HostGuardFunctions, or None.
    """
    module = _extension._C
    if module is None or not hasattr(module, "_guard_arm") or os.environ.get("FPN_FAST_HOST_GUARD", "1") == "0":
        return None
    return HostGuardFunctions(module._guard_arm, module._guard_holds, module._guard_mechanism)

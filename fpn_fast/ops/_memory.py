"""A pool of large CPU buffers for inference, so FPN-sized maps are not page-faulted in anew on
every call (the C++ side, ``csrc/cpu/memory_pool.cpp``, says why and how).

``pooled()`` opens a scope on the current thread in which CPU allocations of 1 MiB and more are
served from, and go back to, the pool; ``optimize_for_inference``'s backbones run their CPU
forward in one. ``FPN_FAST_CPU_POOL_MB`` bounds the bytes the pool keeps between calls (default
1024; 0 turns the pool off); ``empty_cache()`` gives the kept blocks back to the system.
"""
import contextlib
import os
from typing import Dict, Iterator

import torch

from . import _extension

_ENV = "FPN_FAST_CPU_POOL_MB"
_DEFAULT_MB = 1024


def limit_bytes() -> int:
    """The pool's limit from FPN_FAST_CPU_POOL_MB (read on every scope, so it can change).

    Raises:
        ValueError: the variable is not a non-negative integer.
    """
    text = os.environ.get(_ENV, "").strip()
    if not text:
        return _DEFAULT_MB << 20
    try:
        megabytes = int(text)
    except ValueError:
        megabytes = -1
    if megabytes < 0:
        raise ValueError(f"the environment variable {_ENV}={text!r} must be a whole number of MiB >= 0 "
                         f"(0 turns fpn_fast's CPU buffer pool off)")
    return megabytes << 20


@contextlib.contextmanager
def pooled() -> Iterator[bool]:
    """Serve this thread's large CPU allocations from the pool while the block runs; yields
    whether it does (False without the extension, with FPN_FAST_CPU_POOL_MB=0, or when another
    CPU allocator with a higher priority is installed). Nests."""
    limit = limit_bytes()
    active = (limit > 0 and _extension.unavailable_reason("cpu") is None
              and torch.ops.fpn_fast._cpu_pool_enter(limit))
    try:
        yield active
    finally:
        if active:
            torch.ops.fpn_fast._cpu_pool_exit()


def empty_cache() -> int:
    """Free the blocks the pool keeps (those in use stay). Returns the bytes freed."""
    if _extension.unavailable_reason("cpu") is not None:
        return 0
    return int(torch.ops.fpn_fast._cpu_pool_release())


def stats() -> Dict[str, int]:
    """The pool's counters: cached_bytes, cached_blocks, blocks_in_use, limit_bytes, hits, misses."""
    keys = ("cached_bytes", "cached_blocks", "blocks_in_use", "limit_bytes", "hits", "misses")
    if _extension.unavailable_reason("cpu") is not None:
        return dict.fromkeys(keys, 0)
    return dict(zip(keys, (int(v) for v in torch.ops.fpn_fast._cpu_pool_stats())))

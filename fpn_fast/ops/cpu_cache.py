"""The CPU buffer pool of the inference path: a pool of large CPU buffers, so FPN-sized maps are
not page-faulted in anew on every call (the C++ side, ``csrc/runtime/cpu/memory_pool.cpp``, says why and
how).

One API: ``empty_cpu_cache()``, ``set_cpu_cache_limit(mb)``, ``cpu_cache_stats()`` (public, as
``fpn_fast.ops.*``) and ``pooled()`` (the scope the optimized backbones run their CPU forward
in: on the current thread, CPU allocations of 1 MiB and more are served from, and go back to,
the pool). The pool keeps up to a limit of free blocks between calls: FPN_FAST_CPU_POOL_MB
(default 1024; 0 turns the pool off), read once, the first time the pool is used or queried;
``set_cpu_cache_limit`` changes it at run time.
"""
import contextlib
import os
import threading
from typing import Dict, Iterator

import torch

from . import _extension

__all__ = ["empty_cpu_cache", "set_cpu_cache_limit", "cpu_cache_stats", "pooled"]

_ENV = "FPN_FAST_CPU_POOL_MB"
_DEFAULT_MB = 1024

_configure_lock = threading.Lock()
_configured = False  # whether the limit has been set (from the environment, or by set_cpu_cache_limit)


def _limit_from_environment() -> int:
    """The limit FPN_FAST_CPU_POOL_MB asks for, in bytes (the default when it is unset or empty).

    Raises:
        ValueError: the variable is not a whole number of MiB >= 0.
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


def _available() -> bool:
    """Whether the pool exists: it is part of the compiled extension. Its first use applies
    FPN_FAST_CPU_POOL_MB, once (ValueError when the variable is malformed)."""
    global _configured
    if _extension.unavailable_reason("cpu") is not None:
        return False
    if not _configured:
        with _configure_lock:
            if not _configured:
                torch.ops.fpn_fast._cpu_pool_set_limit(_limit_from_environment())
                _configured = True
    return True


@contextlib.contextmanager
def pooled() -> Iterator[bool]:
    """Serve this thread's large CPU allocations from the pool while the block runs; yields
    whether it does (False without the extension, with a limit of 0, or when another CPU
    allocator with a higher priority is installed). Nests.

    Raises:
        ValueError: on first use, FPN_FAST_CPU_POOL_MB is not a whole number of MiB >= 0.
    """
    active = _available() and torch.ops.fpn_fast._cpu_pool_enter()
    try:
        yield active
    finally:
        if active:
            torch.ops.fpn_fast._cpu_pool_exit()


def empty_cpu_cache() -> int:
    """Free the CPU blocks the optimized backbones' buffer pool keeps between calls (blocks in
    use stay), as torch.cuda.empty_cache does for CUDA.

    The pool (``csrc/runtime/cpu/memory_pool.cpp``) serves CPU allocations of 1 MiB and more made inside
    an optimized backbone's forward, and keeps up to a limit of them for the next call: glibc
    returns such blocks to the system on free, and faulting a fresh map in again is slow
    (benchmarks/RESULTS.md). The limit is FPN_FAST_CPU_POOL_MB MiB (default 1024; 0 turns the
    pool off), read once, the first time the pool is used or queried; change it at run time with
    ``set_cpu_cache_limit``. Blocks in use now come back to the pool when they die, up to that
    limit.

    Returns:
        The bytes freed (0 without the compiled extension, which holds the pool).
    """
    if _extension.unavailable_reason("cpu") is not None:
        return 0
    return int(torch.ops.fpn_fast._cpu_pool_release())


def set_cpu_cache_limit(megabytes: int) -> int:
    """Set how much the optimized backbones' CPU buffer pool keeps between calls, at run time
    (it replaces FPN_FAST_CPU_POOL_MB's value, for the whole process).

    Args:
        megabytes: the limit in MiB, a whole number >= 0. A lower limit than the pool holds
            frees cached blocks (the largest first) until what stays fits; 0 turns the pool off:
            every cached block is freed, no later forward pools, and blocks still in use are freed
            when they die instead of being cached.

    Returns:
        The bytes freed now (0 without the compiled extension, which holds the pool).

    Raises:
        TypeError: ``megabytes`` is not an int.
        ValueError: ``megabytes`` is negative.
    """
    global _configured
    if isinstance(megabytes, bool) or not isinstance(megabytes, int):
        raise TypeError(f"set_cpu_cache_limit takes a whole number of MiB, got {type(megabytes).__name__}")
    if megabytes < 0:
        raise ValueError(f"set_cpu_cache_limit takes a limit >= 0 MiB (0 turns the pool off), got {megabytes}")
    if _extension.unavailable_reason("cpu") is not None:
        return 0
    with _configure_lock:
        freed = int(torch.ops.fpn_fast._cpu_pool_set_limit(megabytes << 20))
        _configured = True
    return freed


def cpu_cache_stats() -> Dict[str, int]:
    """The CPU buffer pool's counters.

    Returns:
        {"cached_bytes", "cached_blocks", "blocks_in_use", "limit_bytes", "hits", "misses"}: ints
        (all 0 without the extension; the counts 0 before first use).

    Raises:
        ValueError: FPN_FAST_CPU_POOL_MB, read on first use, is not a whole number >= 0."""
    keys = ("cached_bytes", "cached_blocks", "blocks_in_use", "limit_bytes", "hits", "misses")
    if not _available():
        return dict.fromkeys(keys, 0)
    return dict(zip(keys, (int(v) for v in torch.ops.fpn_fast._cpu_pool_stats())))

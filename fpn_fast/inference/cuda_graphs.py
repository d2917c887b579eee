"""Replay a CUDA plan as one CUDA graph per signature.

A plan's steps launch ~100 kernels whose every argument is fixed by the signature, so on a GPU
the plan is captured once into a ``torch.cuda.CUDAGraph`` and each later call is one copy of the
images into the graph's static input, one replay, and (unless asked otherwise) one copy of each
output out of the graph's static outputs, which the next replay overwrites.

Capture follows PyTorch's documented recipe (``torch.cuda.graphs``): the plan runs twice on a side
stream first, so Triton compiles its kernels and cuDNN picks its algorithms before capture; the
capture runs on a stream the engine keeps per device (``torch.cuda.graph``'s default capture stream
is made once, on whichever device was current first), with ``capture_error_mode="thread_local"``
(CUDA refuses unsafe calls during the capture only in the capturing thread) and with autocast's
weight-cast cache off (a cached cast would outlive the graph). Unlike ``torch.cuda.graph``, which
synchronises the device and empties the allocator's cache on entry, a capture here waits for its
own stream only and never empties the cache: either would break a graph another thread of the
user's is capturing (the measurements of a build, ``ops.measure``, keep to a side stream for the
same reason). fpn_fast's captures take turns across the process (``_CAPTURE_LOCK``).

Memory: all signatures' graphs of a model share one memory pool (``torch.cuda.graph_pool_handle``):
a graph's intermediates may lie where another graph's static outputs are. That is safe because
replays sharing a pool take turns (``ReplayQueue``: one lock, and each replay's stream waits for
the previous replay's copies out), and each call copies its outputs out before another graph
replays. With ``static_outputs`` the caller keeps the static outputs instead, so each graph gets a
pool of its own: only the next replay of the same graph overwrites them.

Where capture cannot work the plan runs eagerly, and the reason is given once per model and
reason (a warning) and kept in the cache's info: capturing raised (an op that synchronises the
device, or another op CUDA graphs do not allow), or the plan calls modules that have hooks.
"""
import threading
import warnings
from collections import OrderedDict
from typing import Callable, Dict, Optional, Set

import torch
from torch import Tensor

__all__ = ["GraphedPlan", "ReplayQueue", "capture"]

WARMUP_RUNS = 2
_CAPTURE_LOCK = threading.Lock()


class ReplayQueue:
    """Replays of graphs that share a memory pool, in turn: a lock, and the event recorded after the
    last replay's copies out, which the next replay's stream waits for (calls from several threads,
    perhaps on several streams, never overlap in the pool)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.done: Optional[torch.cuda.Event] = None


class GraphedPlan:
    """A plan captured as a CUDA graph: ``__call__(x)`` copies x into the static input, replays,
    and returns the outputs (copies, or the static tensors themselves with ``static_outputs``).

    Attributes:
        graph: the captured torch.cuda.CUDAGraph.
        static_input, static_outputs: the graph's input and outputs (overwritten by each replay).
        captured_bytes: device memory the capture added: the bytes its memory pool's segments grew
            by while capturing (the allocator's snapshot of that pool before and after; a graph that
            reuses blocks another graph of the pool freed adds little) plus the static input.
        queue: the ReplayQueue of its memory pool.
    """

    def __init__(self, graph, static_input: Tensor, static_outputs: Dict[str, Tensor], captured_bytes: int,
                 queue: ReplayQueue):
        self.graph = graph
        self.static_input = static_input
        self.static_outputs = static_outputs
        self.captured_bytes = captured_bytes
        self.queue = queue

    def retire(self) -> None:
        """Wait for the pool's last replay (this graph's memory may be reused once it is dropped)."""
        with self.queue.lock:
            if self.queue.done is not None:
                self.queue.done.synchronize()

    def __call__(self, x: Tensor, static_outputs: bool = False) -> Dict[str, Tensor]:
        queue = self.queue
        with queue.lock:
            stream = torch.cuda.current_stream(x.device)
            if queue.done is not None:
                stream.wait_event(queue.done)
            self.static_input.copy_(x)
            self.graph.replay()
            if static_outputs:
                out = OrderedDict(self.static_outputs)
            else:
                out = OrderedDict([(name, level.clone()) for name, level in self.static_outputs.items()])
            done = torch.cuda.Event()
            done.record(stream)
            queue.done = done
            return out


def capture(run: Callable[[Tensor], Dict[str, Tensor]], x: Tensor, pool, autocast: Optional[torch.dtype],
            stream, queue: ReplayQueue, input_format: Optional[torch.memory_format] = None) -> GraphedPlan:
    """Capture ``run`` (a plan's function) for x's signature.

    Args:
        run: the plan. x: an input of its signature (copied into the static input).
        pool: the memory pool to capture into (``torch.cuda.graph_pool_handle()``, shared by the
            graphs of ``queue``), or None for a pool of the graph's own.
        autocast: the autocast dtype in force (the capture re-enters autocast with its cache off).
        stream: a torch.cuda.Stream on x's device, used for the warm-up and the capture.
        queue: the ReplayQueue of the pool.
        input_format: torch.channels_last to allocate the static input so (the plan's first step
            converts its input to channels_last, which is then the static input itself: each
            replay's image is copied once, by ``GraphedPlan.__call__``); None keeps x's strides.

    Returns:
        A GraphedPlan.

    Raises:
        RuntimeError (or another error of the capture): capture is not possible (the caller runs
            the plan eagerly and says why).
    """
    device = x.device
    if input_format is not None and x.dim() == 4:
        static_input = torch.empty(x.shape, dtype=x.dtype, device=device, memory_format=input_format)
    else:
        static_input = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=device)
    static_input.copy_(x)
    current = torch.cuda.current_stream(device)
    with _CAPTURE_LOCK, queue.lock:  # one capture at a time; no replay of the pool meanwhile
        try:
            if queue.done is not None:
                current.wait_event(queue.done)
            stream.wait_stream(current)
            with torch.cuda.stream(stream), _no_autocast_cache(device.type, autocast):
                for _ in range(WARMUP_RUNS):
                    run(static_input)
            stream.synchronize()  # the warm-up's stream only (its errors surface here), never the device
            graph = torch.cuda.CUDAGraph()
            before = _pool_bytes(device, pool)
            with torch.cuda.stream(stream), _no_autocast_cache(device.type, autocast):
                graph.capture_begin(*(() if pool is None else (pool,)), capture_error_mode="thread_local")
                try:
                    static_outputs = run(static_input)
                finally:
                    graph.capture_end()
            current.wait_stream(stream)
            grown = _pool_bytes(device, graph.pool()) - before
        finally:
            # A capture that raised leaves its stream current: restore.
            torch.cuda.set_stream(current)
    return GraphedPlan(graph, static_input, static_outputs,
                       max(grown, 0) + static_input.numel() * static_input.element_size(), queue)


def _pool_bytes(device: torch.device, pool) -> int:
    """The bytes of the allocator's segments in the graph memory pool ``pool`` on ``device`` (0
    for None: a pool not made yet), from its snapshot (host-side bookkeeping, no synchronisation)."""
    if pool is None:
        return 0
    wanted = tuple(pool)
    return sum(segment["total_size"] for segment in torch.cuda.memory_snapshot()
               if segment.get("device") == device.index and tuple(segment.get("segment_pool_id", ())) == wanted)


class _no_autocast_cache:
    """Autocast as the caller set it, with its weight-cast cache off (a context manager)."""

    def __init__(self, device_type: str, dtype: Optional[torch.dtype]):
        self.context = (torch.autocast(device_type, dtype=dtype, cache_enabled=False) if dtype is not None
                        else None)

    def __enter__(self):
        if self.context is not None:
            self.context.__enter__()

    def __exit__(self, *exc):
        if self.context is not None:
            self.context.__exit__(*exc)
        return False


def why_not_capturable(x: Tensor) -> Optional[str]:
    """Why a plan for x cannot be captured now (None if it can be tried)."""
    if x.device.type != "cuda":
        return f"CUDA graphs need CUDA tensors; the input is on {x.device}"
    return None


def warn_once(seen: Set[str], reason: str) -> None:
    """One warning per reason (per model: ``seen`` is the model's)."""
    if reason not in seen:
        seen.add(reason)
        warnings.warn(f"fpn_fast: the optimized backbone runs without a CUDA graph: {reason}", stacklevel=4)

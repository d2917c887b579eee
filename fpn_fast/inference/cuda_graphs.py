"""Replay a CUDA plan as one CUDA graph per signature.

A plan's steps launch ~100 kernels whose every argument is fixed by the signature, so on a GPU
the plan is captured once into a ``torch.cuda.CUDAGraph`` and each later call is one copy of the
images into the graph's static input, one replay, and (unless asked otherwise) one copy of each
output out of the graph's static outputs, which the next replay overwrites.

Capture follows PyTorch's documented recipe (``torch.cuda.graphs``): the plan runs twice on a side
stream first, so Triton compiles its kernels and cuDNN picks its algorithms before capture; the
capture runs with autocast's weight-cast cache off (a cached cast would outlive the graph); all
signatures' graphs of a model share one memory pool (``torch.cuda.graph_pool_handle``), which is
safe because replays are never concurrent: each replay runs on the caller's stream and the
intermediates of one graph are dead before another replays.

Where capture cannot work the plan runs eagerly, and the reason is given once per model and
reason (a warning) and kept in the cache's info: the current stream is already capturing (a graph
cannot be captured inside another), or capturing raised (an op that synchronises the device, or
another op CUDA graphs do not allow).
"""
import threading
import warnings
from collections import OrderedDict
from typing import Callable, Dict, Optional, Set

import torch
from torch import Tensor

__all__ = ["GraphedPlan", "capture"]

WARMUP_RUNS = 2


class GraphedPlan:
    """A plan captured as a CUDA graph: ``__call__(x)`` copies x into the static input, replays,
    and returns the outputs (copies, or the static tensors themselves with ``static_outputs``).

    Attributes:
        graph: the captured torch.cuda.CUDAGraph.
        static_input, static_outputs: the graph's input and outputs (overwritten by each replay).
        captured_bytes: device memory the capture allocated from the shared pool (measured:
            ``torch.cuda.memory_allocated`` before and after), plus the static input.
    """

    def __init__(self, graph, static_input: Tensor, static_outputs: Dict[str, Tensor], captured_bytes: int):
        self.graph = graph
        self.static_input = static_input
        self.static_outputs = static_outputs
        self.captured_bytes = captured_bytes
        # Calls from several threads (and so perhaps several streams) take turns, and each waits on
        # the stream work of the previous one: the static buffers are shared.
        self.lock = threading.Lock()
        self.done: Optional[torch.cuda.Event] = None

    def __call__(self, x: Tensor, static_outputs: bool = False) -> Dict[str, Tensor]:
        with self.lock:
            stream = torch.cuda.current_stream(x.device)
            if self.done is not None:
                stream.wait_event(self.done)
            self.static_input.copy_(x)
            self.graph.replay()
            if static_outputs:
                out = self.static_outputs
            else:
                out = OrderedDict([(name, level.clone()) for name, level in self.static_outputs.items()])
            self.done = torch.cuda.Event()
            self.done.record(stream)
            return out


def capture(run: Callable[[Tensor], Dict[str, Tensor]], x: Tensor, pool, autocast: Optional[torch.dtype]):
    """Capture ``run`` (a plan's function) for x's signature.

    Args:
        run: the plan. x: an input of its signature (copied into the static input).
        pool: the model's shared graph memory pool (``torch.cuda.graph_pool_handle()``).
        autocast: the autocast dtype in force (the capture re-enters autocast with its cache off).

    Returns:
        A GraphedPlan.

    Raises:
        RuntimeError: capture is not possible (the caller runs the plan eagerly and says why).
    """
    device = x.device
    static_input = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=device)
    static_input.copy_(x)
    current = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(current)
    with torch.cuda.stream(side), _no_autocast_cache(device.type, autocast):
        for _ in range(WARMUP_RUNS):
            run(static_input)
    current.wait_stream(side)
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool), _no_autocast_cache(device.type, autocast):
        static_outputs = run(static_input)
    captured = torch.cuda.memory_allocated(device) - before
    return GraphedPlan(graph, static_input, static_outputs, captured + static_input.numel() * static_input.element_size())


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
    if torch.cuda.is_current_stream_capturing():
        return "the current stream is already capturing a CUDA graph (graphs do not nest): the plan runs as is"
    return None


def warn_once(seen: Set[str], reason: str) -> None:
    """One warning per reason (per model: ``seen`` is the model's)."""
    if reason not in seen:
        seen.add(reason)
        warnings.warn(f"fpn_fast: the optimized backbone runs without a CUDA graph: {reason}", stacklevel=4)

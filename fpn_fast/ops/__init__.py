"""The FPN ops, one module per op, each resolved through one dispatch table (``dispatch.TABLE``).

Differentiable, used by the drop-in modules:

====================================  ====================  ===========================================
op                                    module                what it computes
====================================  ====================  ===========================================
``upsample_add(lateral, top, bias)``  ``top_down/``         (lateral + bias[c]) + nearest_upsample(top)
``upsample_add_(lateral, top, bias)`` ``top_down/``         the same, written into ``lateral``
``stride2_pool(x)``                   ``pool/``             F.max_pool2d(x, 1, 2, 0): the 'pool' level
====================================  ====================  ===========================================

Inference only (``fpn_fast.optimize_for_inference`` models), no autograd:

=============================================  ==============  ====================================
``conv2d_act``, ``conv2d_nchw``,               ``conv/``       folded convolutions with their tail
``conv2d_nchw_input_format``, ``conv1x1``                      fused; NCHW outputs; the lateral 1x1
``lateral_upsample_add``                       ``lateral/``    lateral conv + top-down step in one
``to_nchw``, ``to_channels_last``              ``layout.py``   memory-format copies
``empty_cpu_cache``, ``set_cpu_cache_limit``,  ``cpu_cache.py``  the CPU buffer pool
``cpu_cache_stats``
=============================================  ==============  ====================================

Each op decides its route once per call signature from its rows and keeps it as a runner
(``runner.py``; measured rows: ``measure.py``, their choices kept across processes with
``save_choices`` / ``load_choices``: ``choices.py``); every op's TorchScript form and decomposition sit
beside it. Where each file is: docs/design.md, "How the code is laid out".

Backends: "extension" (the compiled fpn_fast._C ops, CPU and CUDA), "triton" (CUDA, or CPU
under TRITON_INTERPRET=1, which must be set before import), "torch" (pure PyTorch, always there),
and "auto" (the default): per op and device type, the first implementation in the table that
runs here and supports the call. Choose with ``set_backend(name)`` (process default),
``with use_backend(name):`` (this thread only) or FPN_FAST_BACKEND. Naming a backend that cannot
run raises BackendUnavailableError saying why; it never silently falls back.
"""
from ._extension import library_path
from .dispatch import (BACKENDS, TABLE, BackendUnavailableError, available_backends, capturing_graph, get_backend,
                       resolve, set_backend, use_backend)
from .reference import nearest_source_index
# The op modules; each declares its rows of the dispatch table when imported.
from .top_down import upsample_add, upsample_add_
from .pool import stride2_pool
from .layout import to_channels_last, to_nchw
from .conv import conv1x1, conv2d_act, conv2d_nchw, conv2d_nchw_input_format
from .lateral import lateral_upsample_add
from .cpu_cache import cpu_cache_stats, empty_cpu_cache, set_cpu_cache_limit
from .choices import ChoicesWarning, load_choices, save_choices

__all__ = [
    "upsample_add", "upsample_add_", "stride2_pool", "conv1x1", "to_nchw", "to_channels_last", "conv2d_act", "lateral_upsample_add",
    "conv2d_nchw", "conv2d_nchw_input_format", "empty_cpu_cache", "set_cpu_cache_limit", "cpu_cache_stats",
    "set_backend", "get_backend", "use_backend", "available_backends", "BackendUnavailableError", "BACKENDS",
    "TABLE", "nearest_source_index", "library_path", "save_choices", "load_choices", "ChoicesWarning",
]

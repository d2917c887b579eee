"""How the main job times and what it records of the machine: the fpn_fast backends that can run
here, the machine and package versions, synchronised timed runs, their summary statistics, and
the progress bars (tqdm, on stderr)."""
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

import fpn_fast
from fpn_fast import ops

from .common import REFERENCE, InputError, torchvision


# ---------------------------------------------------------------------------------------------
# What can run here

def backend_reasons(device_type: str) -> Dict[str, Optional[str]]:
    """Which fpn_fast backends can be timed on a device type.

    Args:
        device_type: "cpu" or "cuda".

    Returns:
        {backend: None if it runs on ``device_type``, else the reason why not}. The Triton
        interpreter is a correctness tool, so Triton on CPU is reported unavailable even when it is
        switched on.
    """
    reasons = {name: per_device.get(device_type, f"no {device_type} support")
               for name, per_device in ops.available_backends().items()}
    if device_type == "cpu" and reasons.get("triton") is None:
        reasons["triton"] = "on CPU Triton runs only in its interpreter (TRITON_INTERPRET=1): not timed"
    return reasons


def selected_backends(choice: str, reasons: Dict[str, Optional[str]]) -> List[str]:
    """The backbone job's backends: the reference first, then the chosen available ones.

    Args:
        choice: "all" or one name of ``ops.BACKENDS``.
        reasons: :func:`backend_reasons` of the device.

    Returns:
        Backend names, ``REFERENCE`` first, no duplicates.

    Raises:
        InputError: ``choice`` names a backend that cannot run on the device.
    """
    if choice == "all":
        chosen = [name for name in ops.BACKENDS if name != "auto" and reasons[name] is None]
    elif choice != "auto" and reasons[choice] is not None:
        raise InputError(f"backend {choice!r} cannot run on this device: {reasons[choice]}")
    else:
        chosen = [choice]
    return [REFERENCE] + [name for name in chosen if name != REFERENCE]


def machine_info(device: torch.device) -> Dict[str, object]:
    """Platform, CPU model, core and thread counts, GPU name and package versions.

    Args:
        device: the device the job runs on.

    Returns:
        A JSON-ready dict (see docs/main_job.md).
    """
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "device": str(device),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    info["versions"] = {"python": platform.python_version(), "torch": torch.__version__,
                        "torchvision": torchvision.__version__ if torchvision else None,
                        "triton": triton_version, "fpn_fast": fpn_fast.__version__,
                        "cuda": torch.version.cuda}
    return info


# ---------------------------------------------------------------------------------------------
# Timing

def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing on CPU.

    Args:
        device: the device the timed work runs on.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def summary_stats(times: Sequence[float]) -> Dict[str, float]:
    """Median, min, max and quartiles of a list of durations.

    Args:
        times: at least one duration, in seconds.

    Returns:
        {"median", "min", "max", "q1", "q3"} in seconds and "runs" (the count).
    """
    q1, _, q3 = statistics.quantiles(times, n=4) if len(times) > 1 else list(times) * 3
    return {"median": statistics.median(times), "min": min(times), "max": max(times),
            "q1": q1, "q3": q3, "runs": len(times)}


def progress(total: int, label: str):
    """A progress bar on stderr, prefixed ``[fpn-fast]``.

    tqdm is imported here, not at import time: the benchmarks use this package as a library
    (models, parity, timing) on machines that may lack the demo extra's progress bars.

    Args:
        total: the number of steps.
        label: what is being done.

    Returns:
        A ``tqdm`` bar; call ``update()`` per step and ``close()`` at the end.

    Raises:
        ImportError: tqdm is not installed (the demo extra: ``pip install "fpn_fast[demo]"``).
    """
    from tqdm import tqdm
    return tqdm(total=total, desc=f"[fpn-fast] {label}", file=sys.stderr, unit="run", dynamic_ncols=True)


def time_runs(fn: Callable[[], object], warmup: int, repeats: int, device: torch.device,
              label: str) -> Dict[str, float]:
    """Time ``repeats`` calls of ``fn`` after ``warmup`` untimed ones.

    On a GPU each call is bracketed by synchronisations, so the time is the device's.

    Args:
        fn: the call to time.
        warmup: untimed calls first (>= 0).
        repeats: timed calls (>= 1).
        device: where ``fn`` runs.
        label: the progress bar's label.

    Returns:
        :func:`summary_stats` of the timed calls, in seconds.
    """
    times = []
    with progress(warmup + repeats, label) as bar:
        for i in range(warmup + repeats):
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            if i >= warmup:
                times.append(time.perf_counter() - start)
            bar.update()
    return summary_stats(times)

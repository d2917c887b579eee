"""Measured route choices kept across processes, so that a restarted server measures nothing.

``save_choices(path)`` writes every decision of this process (``measure.choices()``: the
measured rows' chosen implementation per call signature, with each candidate's time or why it
lost) together with the environment it was measured in. ``load_choices(path)`` reads them back:
a later decision for the same op and call signature then takes the loaded choice without
running or timing anything (``measure.fastest``), as long as its chosen implementation is still
a candidate for the call. Runners already decided in this process keep their route: load
before the first call (or before ``fpn_fast.warmup``).

A choice holds only where it was measured, so a file is used only where everything it depends
on is the same: the torch, CUDA, cuDNN, Triton and fpn_fast versions (else none of its choices
is loaded), and per choice the name of the device it was measured on (a choice made on another
GPU model is skipped). The call signature itself names the shapes, dtypes, layout, autocast
dtype, the cuDNN/TF32 flags and the device index (``measure.cuda_flags``). A file that cannot be
read, or does not hold choices, gives one warning (``ChoicesWarning``) and nothing is loaded:
the routes are measured again, as without a file.

File format (JSON): {"format": FORMAT, "environment": {...}, "decisions": [{"op", "signature",
"chosen", "candidates": {implementation: {"status", "ms", "reason"}}, "device",
"device_name"}]}.
"""
import json
import os
import sys
import tempfile
import warnings
from typing import Dict, Optional

import torch

from . import measure
from .measure import forget_loaded

__all__ = ["save_choices", "load_choices", "forget_loaded", "environment", "ChoicesWarning", "FORMAT"]

FORMAT = "fpn_fast.choices/1"


class ChoicesWarning(UserWarning):
    """A choices file was not used (unreadable, not a choices file, or measured elsewhere)."""


def environment() -> Dict[str, Optional[str]]:
    """What every measured choice depends on besides its call signature and device: the torch,
    CUDA (as torch was built with), cuDNN, Triton and fpn_fast versions (None: absent)."""
    try:
        import triton
        triton_version = str(triton.__version__)
    except ImportError:
        triton_version = None
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    package = sys.modules.get(__name__.split(".")[0])  # fpn_fast, imported before any of its modules
    return {"torch": str(torch.__version__), "cuda": torch.version.cuda,
            "cudnn": None if cudnn is None else str(cudnn), "triton": triton_version,
            "fpn_fast": getattr(package, "__version__", None)}


def _device_name(device: str) -> Optional[str]:
    """The model of the device a choice was measured on ("NVIDIA H100 80GB HBM3"; "cpu" for
    CPU), or None where this process has no such device."""
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        return None
    if d.type != "cuda":
        return d.type
    if not torch.cuda.is_available() or (d.index or 0) >= torch.cuda.device_count():
        return None
    return torch.cuda.get_device_name(d)


def save_choices(path: "str | os.PathLike") -> int:
    """Write this process's measured route choices to ``path`` (replaced atomically).

    Args:
        path: the JSON file to write (its directory must exist).

    Returns:
        The number of choices written (0 where nothing was measured: the file then holds none).

    Raises:
        OSError: the file cannot be written.
    """
    decisions = []
    for decision in measure.choices():
        decision = dict(decision, device_name=_device_name(decision["device"]))
        decision.pop("loaded_from", None)
        decisions.append(decision)
    document = {"format": FORMAT, "environment": environment(), "decisions": decisions}
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, temporary = tempfile.mkstemp(prefix=".choices-", suffix=".json", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(document, f, indent=1)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
    return len(decisions)


def _decision(entry: dict, path: str) -> measure.Decision:
    """A file entry as a Decision; raises KeyError/TypeError/ValueError where it is not one."""
    op, signature, chosen = entry["op"], entry["signature"], entry["chosen"]
    if not all(isinstance(v, str) for v in (op, signature, chosen, entry["device"])):
        raise TypeError("op, signature, chosen and device must be strings")
    candidates = {}
    for name, c in entry["candidates"].items():
        ms = c["ms"]
        if ms is not None and not isinstance(ms, (int, float)):
            raise TypeError(f"candidate {name!r}: ms must be a number or null")
        candidates[str(name)] = measure.Candidate(str(c["status"]), ms, c["reason"])
    if chosen not in candidates:
        raise ValueError(f"the chosen implementation {chosen!r} is not among its candidates")
    return measure.Decision(op, signature, chosen, candidates, entry["device"], path)


def load_choices(path: "str | os.PathLike") -> int:
    """Read route choices written by ``save_choices``: later decisions of the same op and call
    signature take them instead of measuring.

    Args:
        path: a file written by ``save_choices``.

    Returns:
        The number of choices loaded: 0 where the file was written under another environment
        (``environment()``) or cannot be used; choices measured on another device model are
        skipped.

    Raises:
        FileNotFoundError: ``path`` does not exist.

    Warns:
        ChoicesWarning: the file is not valid JSON or not a choices file, or its environment is
        not this process's (each difference named); nothing is loaded, so routes are measured.
    """
    path = os.fspath(path)
    try:
        with open(path) as f:
            document = json.load(f)
        if not isinstance(document, dict) or document.get("format") != FORMAT:
            raise ValueError(f"not a choices file (its format is not {FORMAT!r})")
        recorded, decisions = document["environment"], document["decisions"]
        if not isinstance(recorded, dict) or not isinstance(decisions, list):
            raise ValueError("its environment or decisions are malformed")
        device_names = [entry.get("device_name") for entry in decisions]
        decisions = [_decision(entry, path) for entry in decisions]
    except FileNotFoundError:
        raise
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        warnings.warn(f"fpn_fast: route choices in {path} cannot be used ({type(err).__name__}: {err}); "
                      "the routes are measured again", ChoicesWarning, stacklevel=2)
        return 0
    current = environment()
    different = [f"{key} {recorded.get(key)} (this process: {value})" for key, value in current.items()
                 if recorded.get(key) != value]
    if different:
        warnings.warn(f"fpn_fast: route choices in {path} were measured under " + ", ".join(different)
                      + "; they are not used and the routes are measured again", ChoicesWarning, stacklevel=2)
        return 0
    loaded = [decision for decision, name in zip(decisions, device_names)
              if name is not None and name == _device_name(decision.device)]
    measure.use_loaded(loaded)
    return len(loaded)

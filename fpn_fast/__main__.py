"""``python -m fpn_fast``: a torchvision detector on photographs, torchvision vs fpn_fast (see fpn_fast.demo.cli).

``--version`` and, without the demo extra, ``--help`` are answered here, so both work in any
installation of fpn_fast; everything else is the demo's command line."""
import sys
from typing import List, Optional

import torch

from . import __version__
from .ops import _extension

# The import names of the packages of setup.py's "demo" extra, which the command line needs
# and ``import fpn_fast`` does not.
DEMO_EXTRA_MODULES = ("torchvision", "skimage", "PIL", "tqdm", "matplotlib")

_HELP = """usage: fpn-fast [-h] [--version] [options of the demo]

On a torchvision detector and photographs: is fpn_fast the same as torchvision, and how much
faster? (the main job; see README.md)

This installation lacks the demo extra ({missing}), which the job needs:
  pip install "fpn_fast[demo]"
then `python -m fpn_fast --help` lists the job's options.

options:
  -h, --help  show this message and exit
  --version   print fpn_fast's version, the torch its extension was built against, and exit
"""


def version_line() -> str:
    """fpn_fast's version, the running torch, and what its compiled extension was built against.

    Returns:
        One line, e.g. ``fpn_fast 0.1.0 (torch 2.14.1; extension built against torch 2.14.1,
        CPU kernels)``; when the extension is not used, the reason instead.
    """
    record = _extension.build_record()
    reason = _extension.unavailable_reason("cpu")
    if reason is None and record is not None:
        kernels = "CPU and CUDA kernels" if record.get("cuda_kernels") else "CPU kernels"
        extension = f"extension built against torch {record['torch']}, {kernels}"
    elif reason is None:
        extension = "extension loaded, built before fpn_fast recorded its torch"
    else:
        extension = f"extension not used: {reason}"
    return f"fpn_fast {__version__} (torch {torch.__version__}; {extension})"


def _missing_demo_module() -> Optional[str]:
    import importlib.util
    return next((name for name in DEMO_EXTRA_MODULES if importlib.util.find_spec(name) is None), None)


def main(argv: Optional[List[str]] = None) -> int:
    """``fpn_fast.demo.cli.main``; ``--version``; a short ``--help`` or a one-line error when a
    package of the demo extra is missing.

    Args:
        argv: the arguments (``sys.argv[1:]`` when None).

    Returns:
        0 after ``--version`` (one line on stdout, see :func:`version_line`) or ``--help``;
        otherwise the exit status of ``fpn_fast.demo.cli.main``; 2 when a module of the "demo"
        extra is not installed: the reason and ``pip install "fpn_fast[demo]"`` are one line on
        stderr.

    Raises:
        ModuleNotFoundError: a missing module that is not one of the demo extra's (a broken
            installation of fpn_fast or of its dependencies), with its traceback.
    """
    args = sys.argv[1:] if argv is None else list(argv)
    if "--version" in args:
        print(version_line())
        return 0
    if "-h" in args or "--help" in args:
        missing = _missing_demo_module()
        if missing is not None:
            print(_HELP.format(missing=f"no module named {missing!r}"), end="")
            return 0
    try:
        from .demo.cli import main as demo_main
        return demo_main(args)
    except ModuleNotFoundError as err:
        if (err.name or "").partition(".")[0] not in DEMO_EXTRA_MODULES:
            raise
        print(f"fpn-fast: error: no module named {err.name!r}; python -m fpn_fast needs the demo extra: "
              f'pip install "fpn_fast[demo]"', file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

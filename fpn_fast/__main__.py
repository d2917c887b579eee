"""``python -m fpn_fast``: a torchvision detector on photographs, torchvision vs fpn_fast (see fpn_fast.demo.cli)."""
import sys
from typing import List, Optional

# The import names of the packages of setup.py's "demo" extra, which the command line needs
# and ``import fpn_fast`` does not.
DEMO_EXTRA_MODULES = ("torchvision", "skimage", "PIL", "tqdm", "matplotlib")


def main(argv: Optional[List[str]] = None) -> int:
    """``fpn_fast.demo.cli.main``, or a one-line error when a package of the demo extra is missing.

    Args:
        argv: the arguments (``sys.argv[1:]`` when None).

    Returns:
        The exit status of ``fpn_fast.demo.cli.main``; 2 when a module of the "demo" extra is not
        installed: the reason and ``pip install "fpn_fast[demo]"`` are one line on stderr.

    Raises:
        ModuleNotFoundError: a missing module that is not one of the demo extra's (a broken
            installation of fpn_fast or of its dependencies), with its traceback.
    """
    try:
        from .demo.cli import main as demo_main
        return demo_main(argv)
    except ModuleNotFoundError as err:
        if (err.name or "").partition(".")[0] not in DEMO_EXTRA_MODULES:
            raise
        print(f"fpn-fast: error: no module named {err.name!r}; python -m fpn_fast needs the demo extra: "
              f'pip install "fpn_fast[demo]"', file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""``python -m fpn_fast`` / ``fpn-fast``: backends, pyramid, accuracy and timings of the backbone."""
import sys

from .demo import main

if __name__ == "__main__":
    sys.exit(main())

"""``python -m fpn_fast``: a torchvision detector on photographs, torchvision vs fpn_fast (see fpn_fast.demo)."""
import sys

from .demo import main

if __name__ == "__main__":
    sys.exit(main())

"""The main job's images: the photographs bundled with scikit-image, the user's files and folders,
and their decoding (Pillow) into uint8 RGB tensors. Nothing is downloaded."""
from pathlib import Path
from typing import List, Sequence

from torch import Tensor

from .common import InputError, first_line

# Photographs inside scikit-image's wheel (skimage/data; never fetched at run time). Sources and
# licences, from skimage.data's docstrings:
#   astronaut.png  512x512  Eileen Collins, NASA Great Images database: public domain
#   chelsea.png    300x451  Chelsea the cat, by Stefan van der Walt: CC0
#   rocket.jpg     427x640  DSCOVR launch on Falcon 9, SpaceX photos: public domain
BUNDLED_PHOTOS = ("astronaut.png", "chelsea.png", "rocket.jpg")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def bundled_photos() -> List[Path]:
    """The default photographs (``BUNDLED_PHOTOS``), from scikit-image's installed package data.

    Returns:
        Their paths.

    Raises:
        InputError: scikit-image is not installed or lacks one of them.
    """
    try:
        from importlib.resources import files
        folder = Path(str(files("skimage.data")))
    except ModuleNotFoundError:
        raise InputError("the default photographs come with scikit-image (pip install scikit-image); "
                         "or pass your own with --images") from None
    paths = [folder / name for name in BUNDLED_PHOTOS]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise InputError(f"scikit-image at {folder} lacks the photographs {missing}; pass --images")
    return paths


def find_images(paths: Sequence[str]) -> List[Path]:
    """Image files from files and folders.

    Args:
        paths: files (any name; decoded later), or folders whose ``*.jpg``, ``*.jpeg`` and ``*.png``
            files (not recursive, sorted by name) are taken.

    Returns:
        The image paths, in the order given.

    Raises:
        InputError: a path does not exist, or a folder holds no JPEG/PNG file.
    """
    found = []
    for text in paths:
        path = Path(text)
        if path.is_dir():
            images = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not images:
                raise InputError(f"--images {text}: the folder holds no .jpg, .jpeg or .png file")
            found.extend(images)
        elif path.is_file():
            found.append(path)
        else:
            raise InputError(f"--images {text}: no such file or folder")
    return found


def load_image(path: Path) -> Tensor:
    """Decode an image file (JPEG, PNG, or anything else Pillow reads) as RGB.

    Args:
        path: the file.

    Returns:
        Tensor[3, H, W] uint8: EXIF orientation applied, grey, palette and RGBA images converted to RGB.

    Raises:
        InputError: the file cannot be read or decoded.
    """
    from PIL import Image, ImageOps
    from torchvision.transforms.functional import pil_to_tensor
    try:
        with Image.open(path) as image:
            return pil_to_tensor(ImageOps.exif_transpose(image).convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as err:  # UnidentifiedImageError is an OSError
        raise InputError(f"cannot decode {path} as an image: {first_line(err)}") from None

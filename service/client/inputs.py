"""What the clients accept as an image: encoded bytes, or the path of an image file."""

import os
from pathlib import Path

Image = bytes | str | os.PathLike[str]


def read_image(image: Image) -> bytes:
    return image if isinstance(image, bytes) else Path(image).read_bytes()


def image_name(image: Image, index: int) -> str:
    return f"image{index}" if isinstance(image, bytes) else Path(image).name

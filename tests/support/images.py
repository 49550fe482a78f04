"""Real encoded images generated in code (no files from ../shared)."""

import io

import numpy as np
from PIL import Image


def random_rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth-ish random RGB image, uint8 [height, width, 3]."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def encode(image: Image.Image | np.ndarray, fmt: str, **options: object) -> bytes:
    """Encode a PIL image or uint8 array as `fmt` ("PNG", "JPEG", "BMP", "GIF", ...)."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def channel_variants(seed: int = 0, size: int = 40) -> dict[str, bytes]:
    """One image in every channel layout and container graft must accept: grayscale, RGBA and
    palette PNG, RGB BMP, GIF (still and animated) and JPEG."""
    rgb = Image.fromarray(random_rgb(size, size + 8, seed))
    return {
        "gray.png": encode(rgb.convert("L"), "PNG"),
        "rgba.png": encode(rgb.convert("RGBA"), "PNG"),
        "palette.png": encode(rgb.convert("P"), "PNG"),
        "rgb.bmp": encode(rgb, "BMP"),
        "first-frame.gif": encode(rgb.convert("P"), "GIF"),
        "rgb.jpg": encode(rgb, "JPEG", quality=90),
        "animated.gif": _animated_gif(rgb),
    }


def _animated_gif(first: Image.Image) -> bytes:
    """Two frames; decoders must return the first."""
    second = Image.fromarray(255 - np.asarray(first))
    frames = [first.convert("P"), second.convert("P")]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)

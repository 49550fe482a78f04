"""Images that are not leaves, for measuring the out-of-distribution flag: nothing downloaded.

Two kinds, both deterministic (same images every run):
- `photo`: every colour and greyscale picture scikit-image ships in its package
  (skimage/data/*.png|jpg, no fetch), each whole, as 3 random crops (30-80 % of a side) and
  as a horizontal and a vertical flip of a crop;
- `texture`: synthetic pictures made here: noise (uniform, Gaussian, blurred), gradients,
  stripes, checkerboards, solid colours and binary blobs, in several colours and scales.

`ood_images()` returns (name, PNG bytes) pairs; a name is `kind:source[/variant]`.
Standalone: `python -m bench.ood_images OUT_DIR` writes them as files, to look at.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 256  # the benchmark dataset's side
_CROPS = 3
# skimage.data functions whose image ships inside the package (skimage/data/), colour or grey.
_PHOTOS = (
    "astronaut", "brick", "camera", "cat", "cell", "checkerboard", "clock", "coffee", "coins",
    "colorwheel", "grass", "gravel", "hubble_deep_field", "immunohistochemistry", "logo",
    "microaneurysms", "moon", "page", "retina", "rocket", "text",
)  # fmt: skip


def _rgb(array: np.ndarray) -> np.ndarray:
    """Any skimage image (grey, RGBA, bool, float) as uint8 RGB."""
    array = np.asarray(array)
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    elif array.dtype != np.uint8:
        low, high = float(array.min()), float(array.max())
        array = ((array - low) / max(high - low, 1e-9) * 255).astype(np.uint8)
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    return array[..., :3]


def _png(array: np.ndarray) -> bytes:
    image = Image.fromarray(array).resize((SIZE, SIZE), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _crop(array: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    height, width = array.shape[:2]
    side = int(min(height, width) * rng.uniform(0.3, 0.8))
    top, left = rng.integers(0, height - side + 1), rng.integers(0, width - side + 1)
    return array[top : top + side, left : left + side]


def photos(seed: int = 0) -> Iterator[tuple[str, np.ndarray]]:
    import skimage.data

    rng = np.random.default_rng(seed)
    for source in _PHOTOS:
        picture = _rgb(getattr(skimage.data, source)())
        crops = [_crop(picture, rng) for _ in range(_CROPS)]
        yield f"photo:{source}", picture
        for index, crop in enumerate(crops):
            yield f"photo:{source}/crop{index}", crop
        yield f"photo:{source}/crop0-hflip", crops[0][:, ::-1]
        yield f"photo:{source}/crop1-vflip", crops[1][::-1]


def _blur(array: np.ndarray, passes: int) -> np.ndarray:
    """A cheap box blur (wrapping), enough to make smooth noise."""
    for _ in range(passes):
        array = sum(np.roll(array, shift, axis) for axis in (0, 1) for shift in (-2, 2)) / 4
    return array


def textures(seed: int = 0) -> Iterator[tuple[str, np.ndarray]]:
    import skimage.data

    rng = np.random.default_rng(seed)
    grid = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) / SIZE  # [2, s, s]
    colours = rng.integers(0, 256, size=(8, 3))
    for index in range(4):
        yield f"texture:uniform-noise/{index}", rng.integers(0, 256, (SIZE, SIZE, 3), np.uint8)
        gaussian = rng.normal(128, 40, (SIZE, SIZE, 3))
        yield f"texture:gaussian-noise/{index}", np.clip(gaussian, 0, 255).astype(np.uint8)
        smooth = _blur(rng.uniform(0, 255, (SIZE, SIZE, 3)), 4 + 4 * index)
        yield f"texture:blurred-noise/{index}", _rgb(smooth)
    for index, (a, b) in enumerate(zip(colours[:4], colours[4:], strict=True)):
        t = grid[1] if index % 2 else (grid[0] + grid[1]) / 2
        gradient = a[None, None] * (1 - t[..., None]) + b[None, None] * t[..., None]
        yield f"texture:gradient/{index}", gradient.astype(np.uint8)
        period = 4 * 2**index
        stripes = ((np.arange(SIZE) // period) % 2).astype(bool)[None, :].repeat(SIZE, 0)
        yield f"texture:stripes/{index}", np.where(stripes[..., None], a, b).astype(np.uint8)
        cells = ((np.arange(SIZE)[:, None] // period + np.arange(SIZE)[None] // period) % 2) == 1
        yield f"texture:checkerboard/{index}", np.where(cells[..., None], a, b).astype(np.uint8)
        yield f"texture:solid/{index}", np.broadcast_to(a, (SIZE, SIZE, 3)).astype(np.uint8)
        blobs = skimage.data.binary_blobs(SIZE, blob_size_fraction=0.05 * (index + 1), rng=index)
        yield f"texture:blobs/{index}", np.where(blobs[..., None], a, b).astype(np.uint8)


def ood_images(seed: int = 0) -> list[tuple[str, bytes]]:
    """Every non-leaf image, as (name, PNG of SIZE x SIZE)."""
    return [(name, _png(array)) for name, array in [*photos(seed), *textures(seed)]]


def kind(name: str) -> str:
    """`photo` or `texture`."""
    return name.split(":", 1)[0]


if __name__ == "__main__":
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    for name, data in ood_images():
        (out / f"{name.replace(':', '_').replace('/', '_')}.png").write_bytes(data)
    print(f"wrote {len(ood_images())} images to {out}")

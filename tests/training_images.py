"""Generated image folders for the training tests: coloured shapes a tiny model can learn."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = {"circle": (220, 40, 40), "square": (40, 200, 40), "triangle": (40, 60, 220)}
FORMATS = ("JPEG", "PNG", "BMP", "GIF")


def shape_image(shape: str, rng: np.random.Generator, size: int = 48) -> Image.Image:
    """A noisy grey background with one coloured shape at a random place and scale."""
    background = rng.integers(90, 160, (size, size, 3), dtype=np.uint8)
    image = Image.fromarray(background)
    draw = ImageDraw.Draw(image)
    radius = int(rng.integers(size // 5, size // 3))
    cx, cy = (int(v) for v in rng.integers(radius, size - radius, 2))
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    colour = tuple(
        int(c) for c in np.clip(np.array(SHAPES[shape]) + rng.integers(-20, 20, 3), 0, 255)
    )
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon(
            [(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=colour
        )
    return image


def make_dataset(
    root: Path,
    per_class: int | dict[str, int] = 10,
    seed: int = 0,
    classes: tuple[str, ...] = tuple(SHAPES),
) -> Path:
    """root/<shape>/<i>.<ext>, cycling through JPEG, PNG, BMP and GIF."""
    rng = np.random.default_rng(seed)
    for name in per_class if isinstance(per_class, dict) else classes:
        count = per_class[name] if isinstance(per_class, dict) else per_class
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            fmt = FORMATS[i % len(FORMATS)]
            shape_image(name, rng).save(folder / f"{i:03d}.{fmt.lower()}", format=fmt)
    return root

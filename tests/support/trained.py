"""A tiny model that really learned something, for "a real photo returns the expected class".

The colour classifier from `support.exports` is trained here until it separates red, green and
blue images reliably (a few seconds), then exported with `training.export.export_model`. A real
photo (scikit-image's astronaut) tinted towards one channel must come back as that colour.
"""

from pathlib import Path

import numpy as np

from support.exports import TINY_IMAGE_SIZE, generated_images, make_tiny_model

COLOURS = ("red", "green", "blue")


def train_colour_export(export_dir: Path) -> Path:
    """Train the colour classifier to ~100% on generated images and export it."""
    from training.export import export_model

    model = make_tiny_model(len(COLOURS), TINY_IMAGE_SIZE, steps=3)
    images, labels = generated_images(240, len(COLOURS), TINY_IMAGE_SIZE, seed=1)
    model.fit(images, labels, batch_size=16, epochs=6, verbose=0)
    return export_model(
        model,
        export_dir,
        labels=list(COLOURS),
        image_size=TINY_IMAGE_SIZE,
        backbone="tiny-cnn",
        metrics={"accuracy": 1.0},
        dataset_fingerprint="generated-colours",
    )


def tinted_photo(colour: str, fmt: str = "JPEG") -> bytes:
    """scikit-image's astronaut photo with the other two channels dimmed, encoded."""
    import io

    from PIL import Image
    from skimage import data

    pixels = data.astronaut().astype(np.float32)
    keep = COLOURS.index(colour)
    for channel in range(3):
        if channel != keep:
            pixels[..., channel] *= 0.25
    buffer = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buffer, fmt)
    return buffer.getvalue()

"""Training-time augmentation with Keras preprocessing layers.

It runs in the tf.data pipeline (training batches only), never inside the exported model, so
the serving graph is exactly decode -> resize -> backbone -> head.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras


@dataclass(frozen=True)
class AugmentConfig:
    flip: bool = True  # horizontal and vertical: leaves and most close-ups have no "up"
    rotation: float = 0.1  # fraction of a full turn, both ways
    zoom: float = 0.1
    contrast: float = 0.1

    @property
    def enabled(self) -> bool:
        return self.flip or any(v > 0 for v in (self.rotation, self.zoom, self.contrast))


def build_augmenter(config: AugmentConfig, seed: int) -> keras.Sequential | None:
    """A Sequential of random layers seeded from `seed`, or None when everything is off."""
    if not config.enabled:
        return None
    layers: list[keras.layers.Layer] = []
    if config.flip:
        layers.append(keras.layers.RandomFlip("horizontal_and_vertical", seed=seed))
    if config.rotation > 0:
        layers.append(keras.layers.RandomRotation(config.rotation, seed=seed + 1))
    if config.zoom > 0:
        layers.append(keras.layers.RandomZoom(config.zoom, seed=seed + 2))
    if config.contrast > 0:
        # Pixels are floats in [0, 255] everywhere in graft.
        layers.append(
            keras.layers.RandomContrast(config.contrast, value_range=(0, 255), seed=seed + 3)
        )
    return keras.Sequential(layers, name="augment")

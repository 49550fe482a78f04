"""Feed samples to Keras through tf.data: decoded, resized, cached, shuffled and batched, plus
the class weights for the loss.

Pixels come from `training.preprocess.decode_and_resize`, the same function the exported
serving signature uses, so a model is trained on exactly the pixels it will see in production.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import tensorflow as tf

    from training.scan import Sample

# Decoded float pixels are cached in memory only below this size; above it the encoded bytes
# are cached and decoding (parallel) happens every epoch.
PIXEL_CACHE_BYTES = 768 * 1024**2


def class_weights(samples: Sequence[Sample], num_classes: int) -> dict[int, float]:
    """'Balanced' weights n / (C * n_c): every class contributes equally to the loss."""
    counts = [0] * num_classes
    for sample in samples:
        counts[sample.label] += 1
    total = sum(counts)
    return {c: (total / (num_classes * n) if n else 0.0) for c, n in enumerate(counts)}


def load_pixels(path: tf.Tensor, image_size: int) -> tf.Tensor:
    """File path -> float32 [s, s, 3] in [0, 255], through the shared decode + resize."""
    import tensorflow as tf

    from training.preprocess import decode_and_resize

    return decode_and_resize(tf.io.read_file(path), image_size)


def image_dataset(
    samples: Sequence[Sample],
    image_size: int,
    *,
    batch_size: int,
    num_classes: int,
    shuffle_seed: int | None = None,
    augment: Callable | None = None,
) -> tf.data.Dataset:
    """(pixels float32 [b, s, s, 3], one-hot labels [b, C]) batches.

    Decoding runs in parallel; decoded pixels are cached in memory when they fit
    PIXEL_CACHE_BYTES. Shuffling uses a fixed seed and reshuffles every epoch, so the order of
    a run is reproducible; `augment` (training only) is applied per batch after the cache.
    """
    import tensorflow as tf

    paths = [str(s.decode_path) for s in samples]
    labels = tf.one_hot([s.label for s in samples], num_classes)
    ds = tf.data.Dataset.from_tensor_slices((paths, labels))
    ds = ds.map(lambda p, y: (load_pixels(p, image_size), y), num_parallel_calls=tf.data.AUTOTUNE)
    if len(samples) * image_size * image_size * 3 * 4 <= PIXEL_CACHE_BYTES:
        ds = ds.cache()
    if shuffle_seed is not None:
        ds = ds.shuffle(len(samples), seed=shuffle_seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)
    if augment is not None:
        ds = ds.map(lambda x, y: (augment(x, training=True), y), num_parallel_calls=1)
    return ds.prefetch(tf.data.AUTOTUNE)

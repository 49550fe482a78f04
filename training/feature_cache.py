"""The feature cache: what the frozen part of the network outputs, computed once.

The frozen part's output for an image never changes (BatchNorm runs in inference mode), so it
is computed ONCE per augmented view and the phases train on the cached arrays: every epoch
does the same maths as on pixels, without paying the frozen layers' forward pass again. The
activation entering the top N layers is cached when it can be (one tensor crosses the cut and
it fits ACTIVATION_CACHE_BYTES); otherwise the pooled features are.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

from training.fit_config import FitConfig
from training.model import Classifier, cut_base
from training.pipeline import image_dataset
from training.progress import Reporter
from training.scan import Sample

ACTIVATION_CACHE_BYTES = 2 * 1024**3


@dataclass
class Cached:
    """Outputs of a frozen model, computed once: train [views, n, ...] and val [n, ...]."""

    train: np.ndarray
    train_labels: np.ndarray
    val: np.ndarray | None
    val_labels: np.ndarray | None
    seconds: float = 0.0


def _steps(n: int, batch_size: int) -> int:
    return max(1, math.ceil(n / batch_size))


def activation_cut(
    classifier: Classifier, config: FitConfig, n_train: int, n_val: int, augment: Callable | None
) -> tuple[keras.Model, keras.Model] | None:
    """(trunk, top) when phase 2 can train on cached activations, else None."""
    if not config.cache_features or config.fine_tune_epochs <= 0:
        return None
    parts = cut_base(classifier.base, config.fine_tune_layers)
    if parts is None:
        return None
    views = config.views if augment is not None else 1
    per_image = int(np.prod(parts[0].output.shape[1:])) * 4
    return parts if per_image * (views * n_train + n_val) <= ACTIVATION_CACHE_BYTES else None


def _forward_all(
    forward: Callable, dataset: tf.data.Dataset, reporter: Reporter, description: str, steps: int
) -> tuple[np.ndarray, np.ndarray]:
    outputs, labels = [], []
    with reporter.task(description, steps) as task:
        for x, y in dataset:
            outputs.append(forward(x).numpy())
            labels.append(y.numpy())
            task.advance()
    return np.concatenate(outputs), np.concatenate(labels)


def extract(
    frozen: keras.Model,
    classifier: Classifier,
    train: Sequence[Sample],
    val: Sequence[Sample],
    config: FitConfig,
    augment: Callable | None,
    reporter: Reporter,
) -> Cached:
    """One pass of `frozen` (inference mode) per view of the training images, and one over
    the validation images. View 1 is the images themselves; views 2.. are augmented."""
    start = time.perf_counter()
    forward = tf.function(lambda x: frozen(x, training=False), reduce_retracing=True)
    views = config.views if augment is not None else 1
    size, classes = classifier.image_size, classifier.head.output_shape[-1]
    per_view = []
    for view in range(views):
        ds = image_dataset(
            train,
            size,
            batch_size=config.batch_size,
            num_classes=classes,
            augment=augment if view > 0 else None,
        )
        label = f"cache {view + 1}/{views}" if views > 1 else "cache"
        steps = _steps(len(train), config.batch_size)
        per_view.append(_forward_all(forward, ds, reporter, label, steps))
    val_x = val_y = None
    if val:
        ds = image_dataset(val, size, batch_size=config.batch_size, num_classes=classes)
        steps = _steps(len(val), config.batch_size)
        val_x, val_y = _forward_all(forward, ds, reporter, "cache (val)", steps)
    train_x = np.stack([x for x, _ in per_view])
    return Cached(train_x, per_view[0][1], val_x, val_y, time.perf_counter() - start)


def map_cached(cached: Cached, fn: Callable, batch_size: int) -> Cached:
    """Apply a cheap model (top + pool) to cached activations, batch by batch."""
    forward = tf.function(lambda x: fn(x, training=False), reduce_retracing=True)

    def apply(array: np.ndarray) -> np.ndarray:
        parts = [
            forward(array[i : i + batch_size]).numpy() for i in range(0, len(array), batch_size)
        ]
        return np.concatenate(parts)

    train = np.stack([apply(view) for view in cached.train])
    val = apply(cached.val) if cached.val is not None else None
    return Cached(train, cached.train_labels, val, cached.val_labels, cached.seconds)


def cached_train_dataset(cached: Cached, config: FitConfig) -> tuple[tf.data.Dataset, int | None]:
    """(dataset, steps per epoch or None). One view: the same shuffled finite epochs as the
    pixel path. Several views: a pool of views*n, reshuffled and repeated, cut into epochs of n
    examples (at least `min_cached_steps` batches), so an epoch sees as many (augmented)
    examples as an uncached epoch does."""
    views, n = cached.train.shape[:2]
    labels = cached.train_labels
    if views == 1:
        ds = tf.data.Dataset.from_tensor_slices((cached.train[0], labels))
        ds = ds.shuffle(n, seed=config.seed, reshuffle_each_iteration=True).batch(config.batch_size)
        return ds.prefetch(tf.data.AUTOTUNE), None
    pool = (cached.train.reshape(views * n, *cached.train.shape[2:]), np.tile(labels, (views, 1)))
    ds = tf.data.Dataset.from_tensor_slices(pool)
    ds = ds.shuffle(views * n, seed=config.seed, reshuffle_each_iteration=True).repeat()
    steps = max(_steps(n, config.batch_size), config.min_cached_steps)
    return ds.batch(config.batch_size).prefetch(tf.data.AUTOTUNE), steps


def cached_val_dataset(cached: Cached, batch_size: int) -> tf.data.Dataset | None:
    if cached.val is None:
        return None
    return tf.data.Dataset.from_tensor_slices((cached.val, cached.val_labels)).batch(batch_size)

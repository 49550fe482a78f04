"""The feature cache: what the frozen part of the network outputs, computed once.

The frozen part's output for an image never changes (BatchNorm runs in inference mode), so it
is computed ONCE per augmented view and the phases train on the cached arrays: every epoch
does the same maths as on pixels, without paying the frozen layers' forward pass again. The
activation entering the top N layers is cached when it can be (one tensor crosses the cut and
it fits ACTIVATION_CACHE_BYTES); otherwise the pooled features are.

The frozen part runs on the accelerated runtime `FitConfig.runtime` names (GRAFT_RUNTIME's
semantics: `auto` = ONNX Runtime when installed, else TensorFlow), converted once to ONNX and
fed the float32 pixels of the one tf.data pipeline: only the network call moves, decoding
and augmentation stay TensorFlow's. One runtime fills the whole cache (every view and the
validation set), and the cache records which (`Cached.runtime`).
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from service.errors import RejectedModel
from service.runtime.networks import (
    TENSORFLOW,
    RuntimeUnavailable,
    default_threads,
    open_network,
    resolve,
)
from training.fit_config import FitConfig
from training.model import Classifier, cut_base
from training.pipeline import image_dataset
from training.progress import Reporter
from training.scan import Sample

ACTIVATION_CACHE_BYTES = 2 * 1024**3
# An accelerated runtime must reproduce TensorFlow's output on the first training images to
# within this fraction of the output's largest magnitude, or it does not fill the cache.
# Measured: ONNX Runtime differs by ~2.5e-6 of it (EfficientNet-Lite0 trunk, 224 px).
AGREEMENT_TOLERANCE = 1e-3
PROBE_IMAGES = 4
ONNX_OUTPUT = "features"

Forward = Callable[[tf.Tensor], np.ndarray]


@dataclass(frozen=True)
class FrozenRunner:
    """What runs the frozen part: its forward pass on a batch of pixels, the runtime behind
    it and, on an accelerated runtime, its largest |difference| from TensorFlow on the probe
    images (None on TensorFlow itself)."""

    forward: Forward
    runtime: str = TENSORFLOW
    agreement: float | None = None

    def outputs(
        self,
        samples: Sequence[Sample],
        image_size: int,
        batch_size: int,
        reporter: Reporter,
        augment: Callable | None = None,
    ) -> np.ndarray:
        """The frozen part's output for `samples` through the pipeline: of the images
        themselves, or of one augmented view of each with `augment`."""
        # The labels are not used here: one class keeps their one-hot tensors small.
        ds = image_dataset(
            samples, image_size, batch_size=batch_size, num_classes=1, augment=augment
        )
        steps = _steps(len(samples), batch_size)
        return _forward_all(self.forward, ds, reporter, f"evaluate ({self.runtime})", steps)[0]


@dataclass
class Cached:
    """Outputs of a frozen model, computed once: train [views, n, ...] and val [n, ...], and
    what computed them (`runner`: one runtime fills the whole cache)."""

    train: np.ndarray
    train_labels: np.ndarray
    val: np.ndarray | None
    val_labels: np.ndarray | None
    seconds: float = 0.0
    runner: FrozenRunner | None = field(default=None, repr=False)

    @property
    def runtime(self) -> str:
        return self.runner.runtime if self.runner else TENSORFLOW

    @property
    def agreement(self) -> float | None:
        return self.runner.agreement if self.runner else None


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


def _tensorflow_forward(frozen: keras.Model) -> Forward:
    call = tf.function(lambda x: frozen(x, training=False), reduce_retracing=True)
    return lambda x: call(x).numpy()


def _accelerated_forward(frozen: keras.Model, image_size: int, runtime: str) -> Forward:
    """`frozen` converted to ONNX and opened on `runtime` (every core: the tf.data decoders
    work ahead in the prefetch while it runs). RuntimeUnavailable if the conversion fails or
    the runtime cannot start, RejectedModel if it cannot run the converted file."""
    from training.onnx_export import network_to_onnx  # tf2onnx: only when it is used

    try:
        onnx = network_to_onnx(frozen, image_size, output=ONNX_OUTPUT)
    except Exception as exc:  # tf2onnx raises whatever the op it cannot convert raises
        first = (str(exc).strip() or type(exc).__name__).splitlines()[0]
        raise RuntimeUnavailable(f"tf2onnx cannot convert {frozen.name}: {first}") from exc
    with tempfile.TemporaryDirectory(prefix="graft-cache-") as folder:
        path = Path(folder) / "frozen.onnx"
        path.write_bytes(onnx)
        network = open_network(runtime, path, default_threads(1))  # reads the file now
    return lambda x: network.run(x.numpy())


def _disagreement(
    forward: Forward, frozen: keras.Model, images: tf.data.Dataset
) -> tuple[float, float]:
    """(largest |forward - TensorFlow|, largest |TensorFlow|) on the first PROBE_IMAGES of
    `images`: real pixels from the pipeline, as serving checks on warm-up images."""
    probe = next(iter(images.take(1)))[0][:PROBE_IMAGES]
    want = np.asarray(frozen(probe, training=False))
    return float(np.max(np.abs(forward(probe) - want))), float(np.max(np.abs(want)))


def frozen_runner(
    frozen: keras.Model,
    image_size: int,
    setting: str,
    images: tf.data.Dataset,
    reporter: Reporter,
) -> FrozenRunner:
    """What runs `frozen` for the cache, and how far it was from TensorFlow on the first
    `images`. A runtime named in `setting` must be installed, convert, start and agree with
    TensorFlow, or RuntimeUnavailable / RejectedModel; under `auto` a failure is a warning
    and TensorFlow runs."""
    runtime = resolve(setting)
    if runtime == TENSORFLOW:
        return FrozenRunner(_tensorflow_forward(frozen))
    try:
        forward = _accelerated_forward(frozen, image_size, runtime)
        diff, scale = _disagreement(forward, frozen, images)
        if not diff <= AGREEMENT_TOLERANCE * max(1.0, scale):  # NaN disagrees too
            raise RuntimeUnavailable(
                f"{runtime} disagrees with TensorFlow on the frozen backbone by {diff:.3g} "
                f"(outputs up to {scale:.3g})"
            )
    except (RuntimeUnavailable, RejectedModel) as exc:
        if setting != "auto":
            raise
        reporter.info(f"warning: {exc}; the feature cache runs on TensorFlow")
        return FrozenRunner(_tensorflow_forward(frozen))
    return FrozenRunner(forward, runtime, diff)


def _forward_all(
    forward: Forward, dataset: tf.data.Dataset, reporter: Reporter, description: str, steps: int
) -> tuple[np.ndarray, np.ndarray]:
    outputs, labels = [], []
    with reporter.task(description, steps) as task:
        for x, y in dataset:
            outputs.append(forward(x))
            labels.append(y.numpy())
            task.advance()
    return np.concatenate(outputs), np.concatenate(labels)


def _datasets(
    samples: Sequence[Sample], size: int, classes: int, config: FitConfig, augment: Callable | None
) -> Iterator[tf.data.Dataset]:
    """One dataset per view of `samples`: view 1 the images themselves, views 2.. augmented."""
    views = config.views if augment is not None else 1
    for view in range(views):
        yield image_dataset(
            samples,
            size,
            batch_size=config.batch_size,
            num_classes=classes,
            augment=augment if view > 0 else None,
        )


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
    the validation images, on the runtime `config.runtime` resolves to. View 1 is the images
    themselves; views 2.. are augmented."""
    start = time.perf_counter()
    size, classes = classifier.image_size, classifier.head.output_shape[-1]
    datasets = list(_datasets(train, size, classes, config, augment))
    runner = frozen_runner(frozen, size, config.runtime, datasets[0], reporter)
    forward, runtime = runner.forward, runner.runtime
    steps = _steps(len(train), config.batch_size)
    per_view = []
    for view, ds in enumerate(datasets):
        label = f"cache {view + 1}/{len(datasets)}" if len(datasets) > 1 else "cache"
        per_view.append(_forward_all(forward, ds, reporter, f"{label} ({runtime})", steps))
    val_x = val_y = None
    if val:
        ds = image_dataset(val, size, batch_size=config.batch_size, num_classes=classes)
        steps = _steps(len(val), config.batch_size)
        val_x, val_y = _forward_all(forward, ds, reporter, f"cache (val, {runtime})", steps)
    train_x = np.stack([x for x, _ in per_view])
    seconds = time.perf_counter() - start
    return Cached(train_x, per_view[0][1], val_x, val_y, seconds, runner)


def batched(fn: Callable, batch_size: int) -> Callable[[np.ndarray], np.ndarray]:
    """A cheap Keras model (inference mode) applied to an array, batch by batch."""
    forward = tf.function(lambda x: fn(x, training=False), reduce_retracing=True)

    def apply(array: np.ndarray) -> np.ndarray:
        parts = [
            forward(array[i : i + batch_size]).numpy() for i in range(0, len(array), batch_size)
        ]
        return np.concatenate(parts)

    return apply


def map_cached(cached: Cached, fn: Callable, batch_size: int) -> Cached:
    """Apply a cheap model (top + pool) to cached activations, batch by batch. Its seconds
    count in the cache's: they are part of the one-off cost."""
    start = time.perf_counter()
    apply = batched(fn, batch_size)
    train = np.stack([apply(view) for view in cached.train])
    val = apply(cached.val) if cached.val is not None else None
    seconds = cached.seconds + time.perf_counter() - start
    return Cached(train, cached.train_labels, val, cached.val_labels, seconds, cached.runner)


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

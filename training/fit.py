"""Two-phase transfer learning.

Phase 1 trains the head on a frozen backbone; phase 2 unfreezes the top N layers of the
backbone (BatchNorm stays frozen), recompiles at a low learning rate and fine-tunes, starting
from the phase-1 head.

The frozen part's output for an image never changes (BatchNorm runs in inference mode), so by
default it is computed ONCE per augmented view: the activation entering the top N layers is
cached, phase 1 trains the head on pool(top(cached)) and phase 2 trains top + head on the
cached activations. Every epoch does the same maths as on pixels, without paying the frozen
layers' forward pass again. When the cut cannot be cached (several tensors cross it, or it
would not fit ACTIVATION_CACHE_BYTES), phase 1 still caches pooled features and phase 2
runs on pixels.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from training.data import Sample, class_weights, image_dataset
from training.model import Classifier, cut_base, unfreeze_top
from training.progress import Reporter

ACTIVATION_CACHE_BYTES = 2 * 1024**3


@dataclass
class FitConfig:
    epochs: int = 15
    fine_tune_epochs: int = 3
    fine_tune_layers: int = 20
    batch_size: int = 32
    learning_rate: float = 1e-3
    fine_tune_learning_rate: float = 1e-4
    patience: int = 3
    class_weighting: bool = True
    cache_features: bool = True
    views: int = 2  # cached views per training image: the image itself + (views-1) augmented
    # Cached epochs over several views are at least this many steps: a few-shot set of 40
    # images is 2 batches, and 15 epochs of 2 steps would leave the head untrained.
    min_cached_steps: int = 20
    seed: int = 0
    checkpoint_dir: Path | None = None


@dataclass
class PhaseResult:
    history: dict[str, list[float]] = field(default_factory=dict)
    epoch_seconds: list[float] = field(default_factory=list)
    seconds: float = 0.0
    extract_seconds: float = 0.0  # phase 1 with the cache: the one-off backbone passes

    def to_json(self) -> dict:
        return {
            "history": self.history,
            "epoch_seconds": self.epoch_seconds,
            "seconds": self.seconds,
            "extract_seconds": self.extract_seconds,
        }


@dataclass
class FitResult:
    phase1: PhaseResult
    phase2: PhaseResult | None


class _EpochTimer(keras.callbacks.Callback):
    def __init__(self) -> None:
        super().__init__()
        self.seconds: list[float] = []
        self._start = 0.0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.seconds.append(time.perf_counter() - self._start)


class _EpochBar(keras.callbacks.Callback):
    """One bar tick per epoch, with the latest loss/accuracy in the note."""

    def __init__(self, reporter: Reporter, description: str, epochs: int) -> None:
        super().__init__()
        self._reporter, self._description, self._epochs = reporter, description, epochs

    def on_train_begin(self, logs: dict | None = None) -> None:
        self._context = self._reporter.task(self._description, self._epochs)
        self._task = self._context.__enter__()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs = logs or {}
        short = {
            "loss": "loss",
            "accuracy": "acc",
            "val_loss": "val_loss",
            "val_accuracy": "val_acc",
        }
        note = " ".join(f"{short[k]} {v:.3f}" for k, v in logs.items() if k in short)
        self._task.advance(1, note)

    def on_train_end(self, logs: dict | None = None) -> None:
        self._context.__exit__(None, None, None)


def _callbacks(
    config: FitConfig,
    has_val: bool,
    checkpoint: str,
    reporter: Reporter,
    description: str,
    epochs: int,
) -> tuple[list[keras.callbacks.Callback], _EpochTimer]:
    monitor = "val_loss" if has_val else "loss"
    timer = _EpochTimer()
    callbacks: list[keras.callbacks.Callback] = [
        keras.callbacks.EarlyStopping(monitor, patience=config.patience, restore_best_weights=True),
        keras.callbacks.ReduceLROnPlateau(
            monitor, factor=0.2, patience=max(1, config.patience - 1)
        ),
        timer,
        _EpochBar(reporter, description, epochs),
    ]
    if config.checkpoint_dir is not None:
        config.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        path = str(config.checkpoint_dir / checkpoint)
        callbacks.append(
            keras.callbacks.ModelCheckpoint(path, monitor=monitor, save_best_only=True)
        )
    return callbacks, timer


def _compile(model: keras.Model, learning_rate: float) -> None:
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.CategoricalCrossentropy(),
        metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
    )


@dataclass
class Cached:
    """Outputs of a frozen model, computed once: train [views, n, ...] and val [n, ...]."""

    train: np.ndarray
    train_labels: np.ndarray
    val: np.ndarray | None
    val_labels: np.ndarray | None
    seconds: float = 0.0


def _run(
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
        per_view.append(_run(forward, ds, reporter, label, _steps(len(train), config.batch_size)))
    val_x = val_y = None
    if val:
        ds = image_dataset(val, size, batch_size=config.batch_size, num_classes=classes)
        steps = _steps(len(val), config.batch_size)
        val_x, val_y = _run(forward, ds, reporter, "cache (val)", steps)
    train_x = np.stack([x for x, _ in per_view])
    return Cached(train_x, per_view[0][1], val_x, val_y, time.perf_counter() - start)


def _map_cached(cached: Cached, fn: Callable, batch_size: int) -> Cached:
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


def _steps(n: int, batch_size: int) -> int:
    return max(1, math.ceil(n / batch_size))


def _cached_train_dataset(cached: Cached, config: FitConfig) -> tuple:
    """One view: the same shuffled finite epochs as the pixel path. Several views: a pool of
    views*n, reshuffled and repeated, cut into epochs of n examples (at least
    `min_cached_steps` batches), so an epoch sees as many (augmented) examples as an uncached
    epoch does."""
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


def _cached_val_dataset(cached: Cached, batch_size: int) -> tf.data.Dataset | None:
    if cached.val is None:
        return None
    return tf.data.Dataset.from_tensor_slices((cached.val, cached.val_labels)).batch(batch_size)


def _fit(
    model: keras.Model,
    train: tf.data.Dataset,
    val: tf.data.Dataset | None,
    *,
    epochs: int,
    steps: int | None,
    weights: dict[int, float] | None,
    callbacks: list[keras.callbacks.Callback],
) -> dict[str, list[float]]:
    history = model.fit(
        train,
        validation_data=val,
        epochs=epochs,
        steps_per_epoch=steps,
        class_weight=weights,
        callbacks=callbacks,
        shuffle=False,  # the tf.data pipelines shuffle (seeded) themselves
        verbose=0,
    )
    return {k: [float(v) for v in values] for k, values in history.history.items()}


@dataclass(frozen=True)
class _Phase:
    """What tells one phase's fit apart from another's."""

    description: str  # progress bar
    checkpoint: str  # file name in config.checkpoint_dir
    epochs: int
    learning_rate: float


def _run_phase(
    model: keras.Model,
    train_ds: tf.data.Dataset,
    val_ds: tf.data.Dataset | None,
    *,
    phase: _Phase,
    steps: int | None,
    train: Sequence[Sample],
    config: FitConfig,
    reporter: Reporter,
    started: float,
) -> PhaseResult:
    """Compile `model` and fit it on the given datasets, cached or pixels alike. `started`
    (perf_counter) is when the caller began building the datasets: their set-up is part of
    the phase's time."""
    _compile(model, phase.learning_rate)
    callbacks, timer = _callbacks(
        config, val_ds is not None, phase.checkpoint, reporter, phase.description, phase.epochs
    )
    history = _fit(
        model,
        train_ds,
        val_ds,
        epochs=phase.epochs,
        steps=steps,
        weights=_weights(train, model.output_shape[-1], config),
        callbacks=callbacks,
    )
    return PhaseResult(history, timer.seconds, time.perf_counter() - started)


def train_cached(
    model: keras.Model,
    cached: Cached,
    train: Sequence[Sample],
    config: FitConfig,
    reporter: Reporter,
    *,
    phase: int,
    epochs: int,
    learning_rate: float,
) -> PhaseResult:
    """Fit `model` (whose input is what `cached` holds) on the cached arrays."""
    started = time.perf_counter()
    train_ds, steps = _cached_train_dataset(cached, config)
    checkpoint = "phase1_head.keras" if phase == 1 else "phase2_top.keras"
    return _run_phase(
        model,
        train_ds,
        _cached_val_dataset(cached, config.batch_size),
        phase=_Phase(f"phase {phase} (cached)", checkpoint, epochs, learning_rate),
        steps=steps,
        train=train,
        config=config,
        reporter=reporter,
        started=started,
    )


def _weights(train: Sequence[Sample], classes: int, config: FitConfig) -> dict[int, float] | None:
    return class_weights(train, classes) if config.class_weighting else None


def _pixel_datasets(
    classifier: Classifier,
    train: Sequence[Sample],
    val: Sequence[Sample],
    config: FitConfig,
    augment: Callable | None,
) -> tuple[tf.data.Dataset, tf.data.Dataset | None]:
    size, classes = classifier.image_size, classifier.model.output_shape[-1]
    train_ds = image_dataset(
        train,
        size,
        batch_size=config.batch_size,
        num_classes=classes,
        shuffle_seed=config.seed,
        augment=augment,
    )
    val_ds = (
        image_dataset(val, size, batch_size=config.batch_size, num_classes=classes) if val else None
    )
    return train_ds, val_ds


def train_pixels(
    classifier: Classifier,
    train: Sequence[Sample],
    val: Sequence[Sample],
    config: FitConfig,
    augment: Callable | None,
    reporter: Reporter,
    *,
    phase: int,
    epochs: int,
    learning_rate: float,
) -> PhaseResult:
    """Fit the whole model on pixels with whatever is trainable now (phase 1 uncached, or 2)."""
    started = time.perf_counter()
    train_ds, val_ds = _pixel_datasets(classifier, train, val, config, augment)
    description = "phase 1 (uncached)" if phase == 1 else "phase 2 (fine-tune)"
    return _run_phase(
        classifier.model,
        train_ds,
        val_ds,
        phase=_Phase(description, f"phase{phase}.keras", epochs, learning_rate),
        steps=None,
        train=train,
        config=config,
        reporter=reporter,
        started=started,
    )


def _activation_cache(
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


def _pixels_model_phase(
    classifier: Classifier,
    train: Sequence[Sample],
    val: Sequence[Sample],
    config: FitConfig,
    augment: Callable | None,
    reporter: Reporter,
    phase: int,
) -> PhaseResult:
    epochs = config.epochs if phase == 1 else config.fine_tune_epochs
    rate = config.learning_rate if phase == 1 else config.fine_tune_learning_rate
    return train_pixels(
        classifier, train, val, config, augment, reporter, phase=phase, epochs=epochs,
        learning_rate=rate,
    )  # fmt: skip


def fit(
    classifier: Classifier,
    train: Sequence[Sample],
    val: Sequence[Sample],
    config: FitConfig,
    augment: Callable | None,
    reporter: Reporter,
) -> FitResult:
    """Phase 1 (frozen backbone, head only) then phase 2 (top layers unfrozen, low LR)."""
    keras.utils.set_random_seed(config.seed)
    classifier.base.trainable = False
    split = _activation_cache(classifier, config, len(train), len(val), augment)
    activations = None
    if split is not None:
        trunk, top = split
        activations = extract(trunk, classifier, train, val, config, augment, reporter)
        pooled = keras.Sequential([top, classifier.pool])
        features = _map_cached(activations, pooled, config.batch_size)
    elif config.cache_features:
        features = extract(classifier.features, classifier, train, val, config, augment, reporter)
    if config.cache_features:
        phase1 = train_cached(
            classifier.head, features, train, config, reporter, phase=1, epochs=config.epochs,
            learning_rate=config.learning_rate,
        )  # fmt: skip
        phase1.extract_seconds = features.seconds
    else:
        phase1 = _pixels_model_phase(classifier, train, val, config, augment, reporter, 1)
    if config.fine_tune_epochs <= 0 or unfreeze_top(classifier.base, config.fine_tune_layers) == 0:
        classifier.base.trainable = False
        return FitResult(phase1, None)
    if split is None or activations is None:
        return FitResult(
            phase1, _pixels_model_phase(classifier, train, val, config, augment, reporter, 2)
        )
    inputs = keras.Input(activations.train.shape[2:])
    tail = classifier.head(classifier.pool(split[1](inputs, training=False)))
    phase2 = train_cached(
        keras.Model(inputs, tail, name="graft_top"), activations, train, config, reporter,
        phase=2, epochs=config.fine_tune_epochs, learning_rate=config.fine_tune_learning_rate,
    )  # fmt: skip
    return FitResult(phase1, phase2)

"""Two-phase transfer learning.

Phase 1 trains the head on a frozen backbone. The frozen part's pooled output for an image
never changes (BatchNorm runs in inference mode), so by default it is computed once per
augmented view and the head is trained on those cached features: the maths of an epoch is the
same, the backbone forward pass is paid once instead of every epoch.

Phase 2 unfreezes the top N layers of the backbone (BatchNorm stays frozen), recompiles at a
low learning rate and fine-tunes the whole model on pixels, starting from the phase-1 head.
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
from training.model import Classifier, unfreeze_top
from training.progress import Reporter


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
    views: int = 2  # augmented views per training image cached for phase 1 (1 without augment)
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
            monitor, factor=0.2, patience=max(1, config.patience // 2)
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


def extract_features(
    classifier: Classifier,
    dataset: tf.data.Dataset,
    reporter: Reporter,
    description: str,
    steps: int,
) -> tuple[np.ndarray, np.ndarray]:
    """One pass of the frozen backbone + pooling over a (pixels, labels) dataset."""
    forward = classifier.predict_features
    features, labels = [], []
    with reporter.task(description, steps) as task:
        for pixels, y in dataset:
            features.append(forward(pixels).numpy())
            labels.append(y.numpy())
            task.advance()
    return np.concatenate(features), np.concatenate(labels)


def _steps(n: int, batch_size: int) -> int:
    return max(1, math.ceil(n / batch_size))


def _cached_train_dataset(features: np.ndarray, labels: np.ndarray, config: FitConfig) -> tuple:
    """features: [views, n, D]. One view: the same shuffled finite epochs as the pixel path.
    Several views: a pool of views*n, reshuffled and repeated, cut into epochs of n examples,
    so an epoch sees as many (augmented) examples as an uncached epoch does."""
    views, n = features.shape[:2]
    if views == 1:
        ds = tf.data.Dataset.from_tensor_slices((features[0], labels))
        ds = ds.shuffle(n, seed=config.seed, reshuffle_each_iteration=True).batch(config.batch_size)
        return ds.prefetch(tf.data.AUTOTUNE), None
    pool = (features.reshape(views * n, -1), np.tile(labels, (views, 1)))
    ds = tf.data.Dataset.from_tensor_slices(pool)
    ds = ds.shuffle(views * n, seed=config.seed, reshuffle_each_iteration=True).repeat()
    return ds.batch(config.batch_size).prefetch(tf.data.AUTOTUNE), _steps(n, config.batch_size)


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


def train_head_cached(
    classifier: Classifier,
    train: Sequence[Sample],
    val: Sequence[Sample],
    config: FitConfig,
    augment: Callable | None,
    reporter: Reporter,
) -> PhaseResult:
    """Phase 1 on cached pooled features."""
    start = time.perf_counter()
    views = config.views if augment is not None else 1
    size, classes = classifier.image_size, classifier.head.output_shape[-1]
    train_steps = _steps(len(train), config.batch_size)
    per_view = []
    for view in range(views):
        ds = image_dataset(
            train, size, batch_size=config.batch_size, num_classes=classes, augment=augment
        )
        label = f"features {view + 1}/{views}" if views > 1 else "features"
        per_view.append(extract_features(classifier, ds, reporter, label, train_steps))
    train_features = np.stack([f for f, _ in per_view])
    val_ds = None
    if val:
        ds = image_dataset(val, size, batch_size=config.batch_size, num_classes=classes)
        val_x, val_y = extract_features(
            classifier, ds, reporter, "features (val)", _steps(len(val), config.batch_size)
        )
        val_ds = tf.data.Dataset.from_tensor_slices((val_x, val_y)).batch(config.batch_size)
    extract_seconds = time.perf_counter() - start
    train_ds, steps = _cached_train_dataset(train_features, per_view[0][1], config)
    _compile(classifier.head, config.learning_rate)
    callbacks, timer = _callbacks(
        config, bool(val), "phase1_head.keras", reporter, "phase 1 (cached)", config.epochs
    )
    history = _fit(
        classifier.head,
        train_ds,
        val_ds,
        epochs=config.epochs,
        steps=steps,
        weights=_weights(train, classes, config),
        callbacks=callbacks,
    )
    return PhaseResult(history, timer.seconds, time.perf_counter() - start, extract_seconds)


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
    start = time.perf_counter()
    train_ds, val_ds = _pixel_datasets(classifier, train, val, config, augment)
    _compile(classifier.model, learning_rate)
    description = "phase 1 (uncached)" if phase == 1 else "phase 2 (fine-tune)"
    callbacks, timer = _callbacks(
        config, bool(val), f"phase{phase}.keras", reporter, description, epochs
    )
    history = _fit(
        classifier.model,
        train_ds,
        val_ds,
        epochs=epochs,
        steps=None,
        weights=_weights(train, classifier.model.output_shape[-1], config),
        callbacks=callbacks,
    )
    return PhaseResult(history, timer.seconds, time.perf_counter() - start)


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
    if config.cache_features:
        phase1 = train_head_cached(classifier, train, val, config, augment, reporter)
    else:
        phase1 = train_pixels(
            classifier,
            train,
            val,
            config,
            augment,
            reporter,
            phase=1,
            epochs=config.epochs,
            learning_rate=config.learning_rate,
        )
    if config.fine_tune_epochs <= 0 or unfreeze_top(classifier.base, config.fine_tune_layers) == 0:
        classifier.base.trainable = False
        return FitResult(phase1, None)
    phase2 = train_pixels(
        classifier,
        train,
        val,
        config,
        augment,
        reporter,
        phase=2,
        epochs=config.fine_tune_epochs,
        learning_rate=config.fine_tune_learning_rate,
    )
    return FitResult(phase1, phase2)

"""Two-phase transfer learning.

Phase 1 trains the head on a frozen backbone; phase 2 unfreezes the top N layers of the
backbone (BatchNorm stays frozen), recompiles at a low learning rate and fine-tunes, starting
from the phase-1 head.

By default both phases train on the feature cache (`training.feature_cache`): the activation
entering the top N layers is computed once per augmented view, phase 1 trains the head on
pool(top(cached)) and phase 2 trains top + head on the cached activations. When the cut cannot
be cached (several tensors cross it, or it would not fit), phase 1 still caches pooled
features and phase 2 runs on pixels.

The frozen part runs on the accelerated runtime (`FitConfig.runtime`); training itself runs on
TensorFlow. While the frozen part stays frozen, `FitResult.predict` scores more images (the
test split) the same way: frozen part on the cache's runtime, the rest on TensorFlow.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import keras
import numpy as np
import tensorflow as tf

from training.feature_cache import (
    Cached,
    FrozenRunner,
    activation_cut,
    batched,
    cached_train_dataset,
    cached_val_dataset,
    extract,
    map_cached,
)
from training.fit_config import FitConfig
from training.model import Classifier, unfreeze_top
from training.pipeline import class_weights, image_dataset
from training.progress import Reporter
from training.scan import Sample


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


Predict = Callable[[Sequence[Sample], Reporter], np.ndarray]


class Embed(Protocol):
    """samples -> (pooled features [n, D], probabilities [n, C]) of the trained classifier:
    of the images themselves, or of one augmented view of each with `augment`."""

    def __call__(
        self, samples: Sequence[Sample], reporter: Reporter, augment: Callable | None = None
    ) -> tuple[np.ndarray, np.ndarray]: ...


@dataclass(frozen=True)
class TrainedFeatures:
    """The TRAINED classifier's pooled features (what its head and the exported
    out-of-distribution score see) of every cached view of the training images, their class
    indices, and of the validation images; computed from the cache after phase 2."""

    train: np.ndarray  # [views * n, D]
    train_labels: np.ndarray  # [views * n]
    val: np.ndarray | None  # [n_val, D]
    seconds: float = 0.0  # what computing them took (part of the OOD fit's cost)


@dataclass
class FitResult:
    phase1: PhaseResult
    phase2: PhaseResult | None
    # What ran the frozen part for the feature cache (None: no cache), and how far it was
    # from TensorFlow on the probe images (None on TensorFlow itself).
    feature_runtime: str | None = None
    feature_agreement: float | None = None
    # The trained classifier's probabilities for more images, with the frozen part on the
    # cache's runtime; None when the frozen part itself trained (phase 2 on pixels).
    predict: Predict | None = field(default=None, repr=False)
    # As `predict`, with the pooled features: (features, probabilities) in one pass.
    embed: Embed | None = field(default=None, repr=False)
    # The trained classifier's features of the cached images; None as `embed`.
    trained: TrainedFeatures | None = field(default=None, repr=False)

    def training_info(self) -> dict[str, object]:
        """How the run trained, for graft.json's metrics and the command's JSON."""
        return {
            "feature_runtime": self.feature_runtime,
            "feature_max_abs_diff": self.feature_agreement,
        }


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
    train_ds, steps = cached_train_dataset(cached, config)
    checkpoint = "phase1_head.keras" if phase == 1 else "phase2_top.keras"
    return _run_phase(
        model,
        train_ds,
        cached_val_dataset(cached, config.batch_size),
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


def _schedule(config: FitConfig, phase: int) -> tuple[int, float]:
    """(epochs, learning rate) of phase 1 or 2."""
    if phase == 1:
        return config.epochs, config.learning_rate
    return config.fine_tune_epochs, config.fine_tune_learning_rate


def _cached_top(classifier: Classifier, top: keras.Model, activations: Cached) -> keras.Model:
    """Cached activations -> probabilities, through the backbone's top layers and the head."""
    inputs = keras.Input(activations.train.shape[2:])
    tail = classifier.head(classifier.pool(top(inputs, training=False)))
    return keras.Model(inputs, tail, name="graft_top")


def _predictor(
    classifier: Classifier, runner: FrozenRunner, tail: keras.Model, config: FitConfig
) -> Predict:
    """Frozen part on `runner`, then `tail` (what the cache feeds: the head, or top + head)
    on TensorFlow: the same maths as `classifier.model` while the frozen part is frozen."""
    size, batch_size = classifier.image_size, config.batch_size
    apply = batched(tail, batch_size)
    return lambda samples, reporter: apply(runner.outputs(samples, size, batch_size, reporter))


@dataclass
class _Caches:
    """What phase 1 computed once: the activations entering the top layers (None when the cut
    cannot be cached) and what phase 1 trains on (None: phase 1 ran on pixels)."""

    cut: tuple[keras.Model, keras.Model] | None
    activations: Cached | None
    features: Cached | None


def _caches(
    classifier: Classifier,
    train: Sequence[Sample],
    val: Sequence[Sample],
    config: FitConfig,
    augment: Callable | None,
    reporter: Reporter,
) -> _Caches:
    cut = activation_cut(classifier, config, len(train), len(val), augment)
    if cut is not None:
        activations = extract(cut[0], classifier, train, val, config, augment, reporter)
        pooled = keras.Sequential([cut[1], classifier.pool])
        return _Caches(cut, activations, map_cached(activations, pooled, config.batch_size))
    if config.cache_features:
        features = extract(classifier.features, classifier, train, val, config, augment, reporter)
        return _Caches(None, None, features)
    return _Caches(None, None, None)


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
    caches = _caches(classifier, train, val, config, augment, reporter)
    epochs, rate = _schedule(config, 1)
    features = caches.features
    if features is not None:
        phase1 = train_cached(
            classifier.head, features, train, config, reporter, phase=1, epochs=epochs,
            learning_rate=rate,
        )  # fmt: skip
        phase1.extract_seconds = features.seconds
    else:
        phase1 = train_pixels(
            classifier, train, val, config, augment, reporter, phase=1, epochs=epochs,
            learning_rate=rate,
        )  # fmt: skip
    cache = (features.runtime, features.agreement) if features else (None, None)
    if config.fine_tune_epochs <= 0 or unfreeze_top(classifier.base, config.fine_tune_layers) == 0:
        classifier.base.trainable = False
        # Without a cut, `features` holds pooled features: the head alone follows them.
        runner = features.runner if features and caches.cut is None else None
        head = _predictor(classifier, runner, classifier.head, config) if runner else None
        result = FitResult(phase1, None, *cache, head)
        if features is not None and runner is not None:
            result.embed = _embedder(classifier, runner, None, config)
            result.trained = _trained_features(classifier, features, None, config)
        return result
    epochs, rate = _schedule(config, 2)
    if caches.cut is None or caches.activations is None:
        phase2 = train_pixels(
            classifier, train, val, config, augment, reporter, phase=2, epochs=epochs,
            learning_rate=rate,
        )  # fmt: skip
        return FitResult(phase1, phase2, *cache)  # the frozen part trained: no predictor
    activations = caches.activations
    tail = _cached_top(classifier, caches.cut[1], activations)
    phase2 = train_cached(
        tail, activations, train, config, reporter, phase=2, epochs=epochs, learning_rate=rate
    )
    runner = activations.runner
    predict = _predictor(classifier, runner, tail, config) if runner else None
    result = FitResult(phase1, phase2, *cache, predict)
    if runner is not None:
        result.embed = _embedder(classifier, runner, caches.cut[1], config)
        result.trained = _trained_features(classifier, activations, caches.cut[1], config)
    return result


def _embedder(
    classifier: Classifier, runner: FrozenRunner, top: keras.Model | None, config: FitConfig
) -> Embed:
    """Frozen part on `runner`, then (the top layers and) the pooling, then the head."""
    size, batch_size = classifier.image_size, config.batch_size
    head = batched(classifier.head, batch_size)
    pool = batched(keras.Sequential([top, classifier.pool]), batch_size) if top else None

    def embed(
        samples: Sequence[Sample], reporter: Reporter, augment: Callable | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        outputs = runner.outputs(samples, size, batch_size, reporter, augment)
        pooled = pool(outputs) if pool is not None else outputs
        return pooled, head(pooled)

    return embed


def _trained_features(
    classifier: Classifier, cached: Cached, top: keras.Model | None, config: FitConfig
) -> TrainedFeatures:
    """`cached` (pooled features, or the activations entering `top`) as the trained
    classifier's pooled features: through the (fine-tuned) top layers and the pooling."""
    start = time.perf_counter()
    pool = batched(keras.Sequential([top, classifier.pool]), config.batch_size) if top else None
    views = [pool(view) if pool is not None else view for view in cached.train]
    val = cached.val if pool is None or cached.val is None else pool(cached.val)
    labels = np.argmax(cached.train_labels, axis=-1)
    seconds = time.perf_counter() - start
    return TrainedFeatures(np.concatenate(views), np.tile(labels, len(views)), val, seconds)

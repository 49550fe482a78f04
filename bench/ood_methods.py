"""Which out-of-distribution score `graft train` fits: the measurement behind the choice.

`python -m bench.ood_methods [DATA_DIR] [--seed N]` (GRAFT_BENCH_DATA by default; about as
long as a `graft train`, which it mirrors up to the export) trains with graft's defaults, then
fits every candidate on the trained model's features of the training images, thresholds it at
the conformal 99th percentile of the validation images' scores, and prints, per candidate, the
share flagged of the test split's leaves and of the non-leaf images (bench/ood_images.py) and
its fit time; then, for graft's score, the same shares under other thresholds: on the
validation images alone, or with the scores of 1, 2 or 4 augmented views of each (`graft
train` adds --views minus 1, one by default), and the highest-scoring test leaves' files.
`--val-fraction F` trains on a split with a larger validation share (the test part stays).

The kNN candidate (Sun et al., 2022, "Out-of-Distribution Detection with Deep Nearest
Neighbors": one minus the cosine similarity to the k-th nearest training image) lives here
only: `graft train` fits the Mahalanobis score (training/ood.py).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import keras
import numpy as np

from bench.images import data_dir, shown
from bench.ood_images import kind, ood_images

VAL_FRACTION = 0.1  # graft train's validation share (training.split)


def _options(data: Path, work: Path, seed: int) -> Any:
    from training import commands_train as ct
    from training.defaults import DEFAULT_BACKBONE, DEFAULT_RUNTIME, default_batch_size

    return ct.TrainOptions(
        data_dir=data, name="ood-methods", model_root=work / "models", backbone=DEFAULT_BACKBONE,
        image_size=None, epochs=ct.DEFAULT_EPOCHS, fine_tune_epochs=ct.DEFAULT_FINE_TUNE_EPOCHS,
        fine_tune_layers=None, batch_size=default_batch_size(), max_per_class=None, seed=seed,
        report_dir=work / "report", augment=True, cache=True, views=2, weights="imagenet",
        quiet=True, hidden_units=ct.DEFAULT_HIDDEN_UNITS, runtime=DEFAULT_RUNTIME,
    )  # fmt: skip


def _pooled(classifier: Any, images: list[bytes], batch: int = 32) -> np.ndarray:
    """The trained classifier's pooled features of encoded images (the export's decode)."""
    import tensorflow as tf

    from training.preprocess import decode_batch

    parts = []
    for start in range(0, len(images), batch):
        pixels = decode_batch(tf.constant(images[start : start + batch]), classifier.image_size)
        parts.append(np.asarray(classifier.features(pixels, training=False)))
    return np.concatenate(parts)


class KnnScore(keras.layers.Layer):
    """Pooled features [n, D] -> 1 - cosine similarity to the k-th nearest training image."""

    def __init__(self, bank: np.ndarray, k: int, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self._bank_value = _unit_rows(np.asarray(bank, np.float32))  # [N, D]
        self.k = int(min(k, len(self._bank_value)))

    def build(self, input_shape: tuple) -> None:
        self.bank = self.add_weight(
            shape=self._bank_value.shape, initializer="zeros", trainable=False, name="bank"
        )
        self.bank.assign(self._bank_value)

    def call(self, features: keras.KerasTensor) -> keras.KerasTensor:
        ops = keras.ops
        features = ops.cast(features, "float32")
        norms = ops.sqrt(ops.maximum(ops.sum(ops.square(features), axis=-1, keepdims=True), 1e-12))
        similarity = ops.matmul(features / norms, ops.transpose(self.bank))
        return 1.0 - ops.top_k(similarity, self.k, sorted=True)[0][:, -1]


def _unit_rows(array: np.ndarray) -> np.ndarray:
    return array / np.maximum(np.linalg.norm(array, axis=1, keepdims=True), 1e-6)


Fit = Callable[[], tuple[keras.layers.Layer, float]]  # -> (score layer, threshold)


def _candidates(
    train: np.ndarray, labels: np.ndarray, val: np.ndarray, images: int
) -> dict[str, Fit]:
    """name -> a function that fits that score on the training features and thresholds it at
    the conformal 99th percentile of the validation scores (graft train adds their augmented
    views: `_thresholds`)."""
    from training.ood import PERCENTILE, conformal_quantile, fit_mahalanobis, scores

    def on_validation(fit: Callable[[], keras.layers.Layer]) -> Fit:
        def fitted() -> tuple[keras.layers.Layer, float]:
            layer = fit()
            return layer, conformal_quantile(scores(layer, val), PERCENTILE)

        return fitted

    first = slice(0, images)  # view 1 of the cache: the training images themselves
    return {
        "mahalanobis, every cached view (graft train)": on_validation(
            lambda: fit_mahalanobis(train, labels)
        ),
        "mahalanobis, the images only": on_validation(
            lambda: fit_mahalanobis(train[first], labels[first])
        ),
        "knn k=10, every cached view": on_validation(lambda: KnnScore(train, k=10)),
        "knn k=1, every cached view": on_validation(lambda: KnnScore(train, k=1)),
        "knn k=50, every cached view": on_validation(lambda: KnnScore(train, k=50)),
    }


def measure(data: Path, seed: int = 0, val_fraction: float = VAL_FRACTION) -> dict[str, Any]:
    from training import commands_train as ct
    from training.backbones import get_backbone
    from training.ood import fit_mahalanobis, scores
    from training.progress import Reporter
    from training.split import split

    reporter = Reporter(quiet=True)
    with tempfile.TemporaryDirectory(prefix="graft-ood-methods-") as tmp:
        work = Path(tmp)
        options = _options(data, work, seed)
        dataset = ct._scan(data, work / "reencoded", reporter, for_training=True)
        # The test part is cut first, so a larger validation share leaves it as it is.
        parts = split(dataset, seed=seed, val=val_fraction)
        spec = get_backbone(options.backbone)
        classifier, result = ct._fit(options, spec, dataset, parts, work / "report", reporter)
        test, test_probabilities = ct._embed(classifier, result, parts.test, options, reporter)
        others = ood_images()
        non_leaf = _pooled(classifier, [image for _, image in others])
        # graft train's validation views (the same seed), four of them instead of one
        more_views = replace(options, views=_MOST_VAL_VIEWS + 1)
        val_views = ct._val_views(classifier, result, parts.val, more_views, reporter)
    labels = np.array([s.label for s in parts.test])
    trained = result.trained
    assert trained is not None and trained.val is not None, "needs the feature cache"
    photo = np.array([kind(name) == "photo" for name, _ in others])
    figures: dict[str, Any] = {
        "dataset": shown(data), "val_fraction": val_fraction, "train_images": len(parts.train),
        "accuracy": round(float(np.mean(np.argmax(test_probabilities, 1) == labels)), 4),
        "non_leaf_images": len(others),
    }  # fmt: skip
    candidates = _candidates(trained.train, trained.train_labels, trained.val, len(parts.train))
    for name, fit in candidates.items():
        start = time.perf_counter()
        layer, threshold = fit()
        fit_s = time.perf_counter() - start
        flagged = scores(layer, non_leaf) > threshold
        figures[name] = {
            "test_leaves_flagged": round(float(np.mean(scores(layer, test) > threshold)), 4),
            "non_leaf_flagged": round(float(flagged.mean()), 4),
            "photo_flagged": round(float(flagged[photo].mean()), 4),
            "texture_flagged": round(float(flagged[~photo].mean()), 4),
            "fit_s": round(fit_s, 2),
            "missed": [n for (n, _), f in zip(others, flagged, strict=True) if not f][:10],
        }
    layer = fit_mahalanobis(trained.train, trained.train_labels)  # graft's score
    figures["thresholds"] = _thresholds(layer, trained, test, non_leaf, val_views)
    test_scores = scores(layer, test)
    figures["highest_test_leaves"] = _highest(test_scores, test_probabilities, parts.test)
    return figures


_MOST_VAL_VIEWS = 4  # augmented views of each validation image the bench computes


def _highest(values: np.ndarray, probabilities: np.ndarray, samples: list) -> list[dict]:
    """The test leaves with the highest scores (`values`, graft's score of each): file, true
    and predicted class, confidence."""
    rows = []
    for i in np.argsort(values)[::-1][:7]:
        sample = samples[i]
        rows.append({
            "score": round(float(values[i]), 3),
            "path": "/".join(Path(sample.path).parts[-2:]),
            "label": int(sample.label),
            "predicted": int(np.argmax(probabilities[i])),
            "confidence": round(float(np.max(probabilities[i])), 3),
        })  # fmt: skip
    return rows


def _thresholds(
    layer: keras.layers.Layer,
    trained: Any,
    test: np.ndarray,
    non_leaf: np.ndarray,
    val_views: list[np.ndarray],
) -> dict:
    """graft's score under each way of thresholding it on the validation scores (alone, or
    with those of augmented views of the validation images): the share of test leaves and of
    non-leaf images flagged, and the scores nearest the threshold."""
    from training.ood import PERCENTILE, conformal_quantile, scores

    val, test_scores, others = (scores(layer, f) for f in (trained.val, test, non_leaf))
    views = [scores(layer, f) for f in val_views]
    thresholds: dict[str, tuple[float, int]] = {
        "interpolated 99th percentile (np.percentile)": (
            float(np.percentile(val, PERCENTILE)),
            len(val),
        ),
        "conformal 99th, validation only": (conformal_quantile(val, PERCENTILE), len(val)),
        "validation maximum": (float(val.max()), len(val)),
    }
    for k in (1, 2, len(views)):
        pooled = np.concatenate([val, *views[:k]])
        graft = " (graft train, --views 2)" if k == 1 else ""
        thresholds[f"conformal 99th, validation + {k} augmented view(s){graft}"] = (
            conformal_quantile(pooled, PERCENTILE),
            len(pooled),
        )
    only = np.concatenate(views)
    thresholds[f"conformal 99th, {len(views)} augmented views only"] = (
        conformal_quantile(only, PERCENTILE),
        len(only),
    )
    rows: dict[str, Any] = {
        name: {
            "threshold": round(threshold, 3),
            "scores": count,
            "test_leaves_flagged": round(float(np.mean(test_scores > threshold)), 4),
            "non_leaf_flagged": round(float(np.mean(others > threshold)), 4),
        }
        for name, (threshold, count) in thresholds.items()
    }
    rows["highest_test_scores"] = sorted(np.round(test_scores, 3).tolist())[-10:]
    rows["highest_validation_scores"] = sorted(np.round(val, 3).tolist())[-5:]
    rows["highest_augmented_view_scores"] = sorted(np.round(only, 3).tolist())[-8:]
    rows["lowest_non_leaf_scores"] = sorted(np.round(others, 3).tolist())[:5]
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.ood_methods", description=__doc__)
    parser.add_argument("data", nargs="?", type=Path, default=None, help="a training folder")
    parser.add_argument("--seed", type=int, default=0, help="the split's seed (graft train's)")
    parser.add_argument(
        "--val-fraction", type=float, default=VAL_FRACTION,
        help="the validation share (graft train's: 0.1); the test share stays 0.1",
    )  # fmt: skip
    args = parser.parse_args(argv)
    figures = measure(args.data or data_dir(), args.seed, args.val_fraction)
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()

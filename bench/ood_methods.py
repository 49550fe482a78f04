"""Which out-of-distribution score `graft train` fits: the measurement behind the choice.

`python -m bench.ood_methods [DATA_DIR] [--seed N]` (GRAFT_BENCH_DATA by default; about as
long as a `graft train`, which it mirrors up to the export) trains with graft's defaults, then
fits every candidate on the trained model's features of the training images, thresholds it at
the conformal 99th percentile of the validation images' scores (as `graft train` does), and
prints, per candidate, the share flagged of the test split's leaves and of the non-leaf images
(bench/ood_images.py) and its fit time; then, for graft's score, the same shares under other
thresholds.

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
from pathlib import Path
from typing import Any

import keras
import numpy as np

from bench.images import data_dir, shown
from bench.ood_images import kind, ood_images


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
    the conformal 99th percentile of the validation scores, as `graft train` does."""
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


def measure(data: Path, seed: int = 0) -> dict[str, Any]:
    from training import commands_train as ct
    from training.backbones import get_backbone
    from training.ood import scores
    from training.progress import Reporter

    reporter = Reporter(quiet=True)
    with tempfile.TemporaryDirectory(prefix="graft-ood-methods-") as tmp:
        work = Path(tmp)
        options = _options(data, work, seed)
        dataset, parts = ct._scan_and_split(options, work / "reencoded", work / "report", reporter)
        spec = get_backbone(options.backbone)
        classifier, result = ct._fit(options, spec, dataset, parts, work / "report", reporter)
        test, _ = ct._embed(classifier, result, parts.test, options, reporter)
        others = ood_images()
        non_leaf = _pooled(classifier, [image for _, image in others])
    trained = result.trained
    assert trained is not None and trained.val is not None, "needs the feature cache"
    photo = np.array([kind(name) == "photo" for name, _ in others])
    figures: dict[str, Any] = {"dataset": shown(data), "non_leaf_images": len(others)}
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
    figures["thresholds"] = _thresholds(trained, test, non_leaf)
    return figures


def _thresholds(trained: Any, test: np.ndarray, non_leaf: np.ndarray) -> dict:
    """graft's score under each way of thresholding it on the validation scores: the share of
    test leaves and of non-leaf images flagged, and the scores nearest the threshold."""
    from training.ood import PERCENTILE, conformal_quantile, fit_mahalanobis, scores

    layer = fit_mahalanobis(trained.train, trained.train_labels)
    val, test_scores, others = (scores(layer, f) for f in (trained.val, test, non_leaf))
    thresholds = {
        "interpolated 99th percentile (np.percentile)": float(np.percentile(val, PERCENTILE)),
        "conformal 99th percentile (graft train)": conformal_quantile(val, PERCENTILE),
        "validation maximum": float(val.max()),
    }
    rows: dict[str, Any] = {
        name: {
            "threshold": round(threshold, 3),
            "test_leaves_flagged": round(float(np.mean(test_scores > threshold)), 4),
            "non_leaf_flagged": round(float(np.mean(others > threshold)), 4),
        }
        for name, threshold in thresholds.items()
    }
    rows["highest_test_scores"] = sorted(np.round(test_scores, 3).tolist())[-10:]
    rows["highest_validation_scores"] = sorted(np.round(val, 3).tolist())[-5:]
    rows["lowest_non_leaf_scores"] = sorted(np.round(others, 3).tolist())[:5]
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.ood_methods", description=__doc__)
    parser.add_argument("data", nargs="?", type=Path, default=None, help="a training folder")
    parser.add_argument("--seed", type=int, default=0, help="the split's seed (graft train's)")
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.data or data_dir(), args.seed), indent=2))


if __name__ == "__main__":
    main()

"""Which out-of-distribution score `graft train` fits: the measurement behind the choice.

`python -m bench.ood_methods [DATA_DIR]` (GRAFT_BENCH_DATA by default; about as long as a
`graft train`, which it mirrors up to the export) trains with graft's defaults, then fits every
candidate on the trained model's features of the training images, thresholds it at the 99th
percentile of the validation images' scores, and prints, per candidate, the share flagged of
the test split's leaves and of the non-leaf images (bench/ood_images.py), and its fit time.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.images import data_dir, shown
from bench.ood_images import kind, ood_images


def _options(data: Path, work: Path) -> Any:
    from training import commands_train as ct
    from training.defaults import DEFAULT_BACKBONE, DEFAULT_RUNTIME, default_batch_size

    return ct.TrainOptions(
        data_dir=data, name="ood-methods", model_root=work / "models", backbone=DEFAULT_BACKBONE,
        image_size=None, epochs=ct.DEFAULT_EPOCHS, fine_tune_epochs=ct.DEFAULT_FINE_TUNE_EPOCHS,
        fine_tune_layers=None, batch_size=default_batch_size(), max_per_class=None, seed=0,
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


def _candidates(train: np.ndarray, labels: np.ndarray, images: int) -> dict[str, Any]:
    """name -> a function that fits that score on the training features."""
    from training.ood import KNN, MAHALANOBIS, KnnScore, fit_score

    first = slice(0, images)  # view 1 of the cache: the training images themselves
    return {
        "mahalanobis, every cached view": lambda: fit_score(train, labels, MAHALANOBIS),
        "mahalanobis, the images only": lambda: fit_score(train[first], labels[first]),
        "knn k=10, every cached view": lambda: fit_score(train, labels, KNN),
        "knn k=1, every cached view": lambda: KnnScore(train, k=1),
        "knn k=50, every cached view": lambda: KnnScore(train, k=50),
    }


def measure(data: Path) -> dict[str, Any]:
    from training import commands_train as ct
    from training.backbones import get_backbone
    from training.ood import PERCENTILE, scores
    from training.progress import Reporter

    reporter = Reporter(quiet=True)
    with tempfile.TemporaryDirectory(prefix="graft-ood-methods-") as tmp:
        work = Path(tmp)
        options = _options(data, work)
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
    for name, fit in _candidates(trained.train, trained.train_labels, len(parts.train)).items():
        start = time.perf_counter()
        layer = fit()
        threshold = float(np.percentile(scores(layer, trained.val), PERCENTILE))
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
    return figures


if __name__ == "__main__":
    source = Path(sys.argv[1]) if len(sys.argv) > 1 else data_dir()
    print(json.dumps(measure(source), indent=2))

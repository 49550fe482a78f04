"""Classification metrics from true labels and predicted probabilities, plus the two ways of
getting those probabilities: the in-memory Keras model (after training) and a published
SavedModel called through its `serving_default` signature (exactly what serving runs)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from service.store.layout import LABELS_FILE, SERVING_SIGNATURE
from training.progress import Reporter
from training.scan import Sample

if TYPE_CHECKING:
    from training.model import Classifier


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """[true, predicted] counts."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (y_true, y_pred), 1)
    return matrix


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator / denominator) if denominator else 0.0


def per_class_scores(matrix: np.ndarray, labels: Sequence[str]) -> dict[str, dict[str, float]]:
    scores = {}
    for c, label in enumerate(labels):
        tp = matrix[c, c]
        precision = _ratio(tp, matrix[:, c].sum())
        recall = _ratio(tp, matrix[c, :].sum())
        f1 = _ratio(2 * precision * recall, precision + recall)
        support = int(matrix[c, :].sum())
        scores[label] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
    return scores


def top_k_accuracy(y_true: np.ndarray, probabilities: np.ndarray, k: int) -> float:
    top = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    return float(np.mean(np.any(top == y_true[:, None], axis=1))) if len(y_true) else 0.0


def most_confused(matrix: np.ndarray, labels: Sequence[str], limit: int = 5) -> list[dict]:
    pairs = [
        {"true": labels[t], "predicted": labels[p], "count": int(matrix[t, p])}
        for t in range(len(labels))
        for p in range(len(labels))
        if t != p and matrix[t, p] > 0
    ]
    return sorted(pairs, key=lambda pair: -pair["count"])[:limit]


def classification_metrics(
    y_true: np.ndarray, probabilities: np.ndarray, labels: Sequence[str], top_k: int = 3
) -> dict:
    """accuracy, macro_f1 (over classes present in y_true or predicted), per_class,
    top_k_accuracy, confusion_matrix ([true][predicted]), most_confused, labels, count."""
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.argmax(probabilities, axis=1)
    matrix = confusion_matrix(y_true, y_pred, len(labels))
    per_class = per_class_scores(matrix, labels)
    # A class with no test image and no prediction says nothing about the model.
    seen = [c for c in range(len(labels)) if matrix[c, :].sum() or matrix[:, c].sum()]
    macro_f1 = float(np.mean([per_class[labels[c]]["f1"] for c in seen])) if seen else 0.0
    ks = sorted({1, min(top_k, len(labels))})
    return {
        "accuracy": float(np.mean(y_pred == y_true)) if len(y_true) else 0.0,
        "macro_f1": macro_f1,
        "top_k_accuracy": {str(k): top_k_accuracy(y_true, probabilities, k) for k in ks},
        "per_class": per_class,
        "labels": list(labels),
        "confusion_matrix": matrix.tolist(),
        "most_confused": most_confused(matrix, labels),
        "count": len(y_true),
    }


def predict_keras(
    classifier: Classifier, samples: Sequence[Sample], batch_size: int, reporter: Reporter
) -> np.ndarray:
    """Probabilities from the trained Keras model, through the training input pipeline."""
    import tensorflow as tf

    from training.pipeline import image_dataset

    model = classifier.model
    forward = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
    ds = image_dataset(
        samples,
        classifier.image_size,
        batch_size=batch_size,
        num_classes=model.output_shape[-1],
    )
    out = []
    with reporter.task("evaluate", -(-len(samples) // batch_size)) as task:
        for pixels, _ in ds:
            out.append(forward(pixels).numpy())
            task.advance()
    return np.concatenate(out)


def embed_keras(
    classifier: Classifier,
    samples: Sequence[Sample],
    batch_size: int,
    reporter: Reporter,
    augment: Callable | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Pooled features and probabilities from the trained Keras model in one pass, through
    the training input pipeline (when no feature cache can do it): of the images themselves,
    or of one augmented view of each with `augment`."""
    import keras
    import tensorflow as tf

    from training.pipeline import image_dataset

    # `features` and `model` share the classifier's input: one graph, the backbone run once.
    both = keras.Model(
        classifier.model.inputs, [classifier.features.output, classifier.model.output]
    )
    forward = tf.function(lambda x: both(x, training=False), reduce_retracing=True)
    ds = image_dataset(
        samples,
        classifier.image_size,
        batch_size=batch_size,
        num_classes=classifier.model.output_shape[-1],
        augment=augment,
    )
    features, probabilities = [], []
    with reporter.task("evaluate", -(-len(samples) // batch_size)) as task:
        for pixels, _ in ds:
            pooled, probs = forward(pixels)
            features.append(np.asarray(pooled, np.float32))
            probabilities.append(np.asarray(probs, np.float32))
            task.advance()
    return np.concatenate(features), np.concatenate(probabilities)


def predict_saved_model(
    version_dir: Path, samples: Sequence[Sample], batch_size: int, reporter: Reporter
) -> tuple[np.ndarray, list[str]]:
    """Probabilities from a published SavedModel's serving_default on the files' bytes, and the
    model's labels (assets/labels.txt)."""
    import tensorflow as tf

    loaded = tf.saved_model.load(str(version_dir))
    serve = loaded.signatures[SERVING_SIGNATURE]
    labels = (version_dir / LABELS_FILE).read_text().splitlines()
    out = []
    with reporter.task("evaluate", -(-len(samples) // batch_size)) as task:
        for start in range(0, len(samples), batch_size):
            batch = [s.decode_path.read_bytes() for s in samples[start : start + batch_size]]
            out.append(serve(images=tf.constant(batch))["probabilities"].numpy())
            task.advance()
    return np.concatenate(out), labels

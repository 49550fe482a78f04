"""The out-of-distribution flag: how far an image's features are from the training images'.

Softmax always picks one of the known classes, so a photo of a cat sent to the apple-leaf
model gets a confident leaf disease. The pooled backbone features tell such images apart: the
training images of each class sit in a cluster, and an image unlike any of them lies far from
every cluster. The score is fitted on the training images' pooled features (those the feature
cache already computes), and its threshold is the 99th percentile of the validation images'
scores, so about 1 % of images like the training data are flagged.

Two scores, compared by bench/ood_methods.py (docs/decisions.md): `mahalanobis`, the one
`graft train` fits (METHOD) and the op allowlist covers, the
squared Mahalanobis distance to the nearest class mean under one covariance shared by every
class, shrunk towards a multiple of the identity (Ledoit-Wolf; Lee et al., 2018, "A Simple
Unified Framework for Detecting Out-of-Distribution Samples"), divided by the feature width;
and `knn`, one minus the cosine similarity to the k-th nearest training image (Sun et al.,
2022, "Out-of-Distribution Detection with Deep Nearest Neighbors").

The score is a Keras layer on the pooled features. The exported model is built from it
(`with_ood`), so the SavedModel's signatures and the ONNX network run that one
implementation; training scores the validation and test images with the same layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np

from service.store.layout import ONNX_OUTPUT, OOD_FLAG_OUTPUT, OOD_SCORE_OUTPUT

MAHALANOBIS = "mahalanobis"
KNN = "knn"
METHODS = (MAHALANOBIS, KNN)
METHOD = MAHALANOBIS
PERCENTILE = 99.0
KNN_K = 10
_BATCH = 256
_DIGITS = 4  # significant digits of the scores metrics.json keeps


class MahalanobisScore(keras.layers.Layer):
    """Pooled features [n, D] -> min over classes of |W (f - mean_c)|^2 / D, where W is the
    inverse square root of the shared, shrunk covariance (so the distance is Mahalanobis').
    Features are first moved by `offset` (the training features' mean), which keeps the
    float32 terms below small enough for TensorFlow and ONNX Runtime to agree."""

    def __init__(
        self, offset: np.ndarray, transform: np.ndarray, centers: np.ndarray, **kwargs: object
    ) -> None:
        super().__init__(**kwargs)
        self._offset_value = np.asarray(offset, np.float32)  # [D]
        self._transform_value = np.asarray(transform, np.float32)  # [D, D], W
        self._centers_value = np.asarray(centers, np.float32)  # [C, D], (means - offset) W

    def build(self, input_shape: tuple) -> None:
        self.offset = self.add_weight(
            shape=self._offset_value.shape, initializer="zeros", trainable=False, name="offset"
        )
        self.offset.assign(self._offset_value)
        self.transform = self.add_weight(
            shape=self._transform_value.shape, initializer="zeros", trainable=False,
            name="transform",
        )  # fmt: skip
        self.centers = self.add_weight(
            shape=self._centers_value.shape, initializer="zeros", trainable=False, name="centers"
        )
        self.transform.assign(self._transform_value)
        self.centers.assign(self._centers_value)

    def call(self, features: keras.KerasTensor) -> keras.KerasTensor:
        ops = keras.ops
        z = ops.matmul(ops.cast(features, "float32") - self.offset, self.transform)
        # The differences themselves ([n, C, D]), not |z|^2 - 2 z.c + |c|^2: classes lie far
        # apart in the whitened space, and that expansion loses the small distance of an
        # image to its own class in float32 (runtimes then disagree by 1e-3 of it).
        squared = ops.sum(ops.square(z[:, None, :] - self.centers[None, :, :]), axis=-1)
        return ops.min(squared, axis=-1) / float(self._transform_value.shape[0])


class KnnScore(keras.layers.Layer):
    """Pooled features [n, D] -> 1 - cosine similarity to the k-th nearest training image."""

    def __init__(self, bank: np.ndarray, k: int = KNN_K, **kwargs: object) -> None:
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
        kth = ops.top_k(similarity, self.k, sorted=True)[0][:, -1]
        return 1.0 - kth


def _unit_rows(array: np.ndarray) -> np.ndarray:
    return array / np.maximum(np.linalg.norm(array, axis=1, keepdims=True), 1e-6)


def shrunk_covariance(centered: np.ndarray) -> tuple[np.ndarray, float]:
    """Ledoit-Wolf: the sample covariance of `centered` [n, D] pulled towards mu * I by the
    shrinkage that minimises the expected squared error; (covariance, shrinkage)."""
    x = centered.astype(np.float64)
    n, d = x.shape
    sample = x.T @ x / n
    mu = float(np.trace(sample)) / d
    squares = x**2
    spread = float(np.sum(sample**2))  # sum of the squared entries of the sample covariance
    beta = (float(np.sum(squares.T @ squares)) / n - spread) / (d * n)
    delta = (spread - 2 * mu * float(np.trace(sample)) + d * mu**2) / d
    beta = min(beta, delta)
    shrinkage = 0.0 if delta <= 0 else float(np.clip(beta / delta, 0.0, 1.0))
    return (1 - shrinkage) * sample + shrinkage * mu * np.eye(d), shrinkage


def fit_mahalanobis(features: np.ndarray, labels: np.ndarray) -> MahalanobisScore:
    """The score layer for `features` [n, D] of classes `labels` [n]."""
    features = features.astype(np.float64)
    classes = np.unique(labels)
    means = np.stack([features[labels == c].mean(axis=0) for c in classes])
    centered = features - means[np.searchsorted(classes, labels)]
    covariance, _ = shrunk_covariance(centered)
    values, vectors = np.linalg.eigh(covariance)
    floor = max(float(values.max()) * 1e-6, 1e-12)  # a flat direction would divide by zero
    transform = (vectors / np.sqrt(np.maximum(values, floor))) @ vectors.T
    offset = features.mean(axis=0)
    return MahalanobisScore(offset, transform, (means - offset) @ transform, name="ood_score")


def fit_score(features: np.ndarray, labels: np.ndarray, method: str = METHOD) -> keras.layers.Layer:
    if method == MAHALANOBIS:
        return fit_mahalanobis(features, labels)
    if method == KNN:
        return KnnScore(features, name="ood_score")
    raise ValueError(f"unknown out-of-distribution method {method!r}; choose one of {METHODS}")


def scores(layer: keras.layers.Layer, features: np.ndarray) -> np.ndarray:
    """`layer`'s scores for `features`, batch by batch, as float32 [n]."""
    if len(features) == 0:
        return np.zeros([0], np.float32)
    parts = [
        np.asarray(layer(features[i : i + _BATCH].astype(np.float32)))
        for i in range(0, len(features), _BATCH)
    ]
    return np.concatenate(parts).astype(np.float32)


@dataclass(frozen=True)
class OodDetector:
    """A fitted score layer and its threshold: ood_score <= threshold is in distribution."""

    method: str
    threshold: float
    percentile: float
    layer: keras.layers.Layer

    def manifest(self) -> dict[str, object]:
        """What graft.json records of it."""
        return {"method": self.method, "threshold": self.threshold, "percentile": self.percentile}


def fit_detector(
    train: np.ndarray,
    train_labels: np.ndarray,
    val: np.ndarray,
    method: str = METHOD,
    percentile: float = PERCENTILE,
) -> tuple[OodDetector, np.ndarray]:
    """The score fitted on the training features, thresholded at the `percentile` of the
    validation features' scores; (detector, validation scores)."""
    if len(val) == 0:
        raise ValueError("the out-of-distribution threshold needs validation images")
    layer = fit_score(train, train_labels, method)
    val_scores = scores(layer, val)
    threshold = float(np.percentile(val_scores.astype(np.float64), percentile))
    return OodDetector(method, threshold, percentile, layer), val_scores


# What a model `with_ood` made returns, in this order (a list: the probabilities stay first,
# where everything that reads one output expects them).
MODEL_OUTPUTS = (ONNX_OUTPUT, OOD_SCORE_OUTPUT, OOD_FLAG_OUTPUT)


def with_ood(model: keras.Model, detector: OodDetector) -> keras.Model:
    """`model` (pixels -> probabilities, pooling its backbone's feature map once with a
    GlobalAveragePooling2D) -> [probabilities, ood_score, in_distribution]: the detector's
    score on those same pooled features, so the backbone still runs once."""
    graph = keras.Model(model.inputs, model.outputs)  # Sequential too: one functional graph
    score = detector.layer(_pooled(graph))
    flag = keras.ops.less_equal(score, detector.threshold)
    outputs = [graph.outputs[0], score, flag]
    return keras.Model(graph.inputs[0], outputs, name=f"{model.name}_ood")


def named_outputs(outputs: object) -> dict[str, object]:
    """A model's outputs by name: {probabilities} or, from a `with_ood` model, all three."""
    if isinstance(outputs, list | tuple):
        return dict(zip(MODEL_OUTPUTS, outputs, strict=True))
    return {ONNX_OUTPUT: outputs}


def _pooled(graph: keras.Model) -> keras.KerasTensor:
    """The output of the graph's global pooling nearest its output: the pooled features."""
    for depth in sorted(graph._nodes_by_depth):  # depth 0: the output
        for node in graph._nodes_by_depth[depth]:
            if isinstance(node.operation, keras.layers.GlobalAveragePooling2D):
                return node.output_tensors[0]
    raise ValueError(f"{graph.name} has no GlobalAveragePooling2D to score features after")


def _rounded(values: np.ndarray) -> list[float]:
    return [float(f"{value:.{_DIGITS}g}") for value in values.tolist()]


def record(detector: OodDetector, val_scores: np.ndarray, test_scores: np.ndarray) -> dict:
    """What metrics.json records: the method, the threshold, the share of validation and test
    images flagged, and their scores (4 significant digits) for the report's histogram."""

    def flagged(values: np.ndarray) -> float | None:
        return round(float(np.mean(values > detector.threshold)), 5) if len(values) else None

    return {
        **detector.manifest(),
        "validation_flagged_rate": flagged(val_scores),
        "test_flagged_rate": flagged(test_scores),
        "validation_scores": _rounded(val_scores),
        "test_scores": _rounded(test_scores),
    }

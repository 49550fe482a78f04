"""The out-of-distribution flag: how far an image's features are from the training images'.

Softmax always picks one of the known classes, so a photo of a cat sent to the apple-leaf
model gets a confident leaf disease. The pooled backbone features tell such images apart: the
training images of each class sit in a cluster, and an image unlike any of them lies far from
every cluster. The score is the squared Mahalanobis distance to the nearest class mean under
one covariance shared by every class, shrunk towards a multiple of the identity (Ledoit-Wolf;
Lee et al., 2018, "A Simple Unified Framework for Detecting Out-of-Distribution Samples"),
divided by the feature width. bench/ood_methods.py compares it with a kNN distance
(docs/decisions.md, decision 57).

It is fitted on the training images' pooled features (those the feature cache already
computes). Its threshold is the 99th percentile of the scores of the validation images and of
augmented views of them (as many per image as the cache makes of each training image), taken
the split-conformal way: the ceil((n + 1) * 0.99)-th smallest of n scores, so that a new image
like those is flagged with probability at most 1 % whatever n is. The usual interpolated
percentile of a few hundred scores sits lower (between the 3rd and 4th highest of 255), and
flags more than 1 % of new images on average. The augmented views stand for real traffic's
framing and light on leaves the network never trained on; they double the scores the
percentile rests on, where 255 validation images alone left it to their top 2 or 3 (one
unlucky split flagged 2.75 % of its test leaves; decision 57).

The score is a Keras layer on the pooled features. The exported model is built from it
(`with_ood`), so the SavedModel's signatures and the ONNX network run that one
implementation; training scores the validation and test images with the same layer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import keras
import numpy as np

from service.store.layout import ONNX_OUTPUT, OOD_FLAG_OUTPUT, OOD_SCORE_OUTPUT

MAHALANOBIS = "mahalanobis"
PERCENTILE = 99.0
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


def shrunk_covariance(centered: np.ndarray) -> tuple[np.ndarray, float]:
    """Ledoit-Wolf: the sample covariance of `centered` [n, D] pulled towards mu * I by the
    shrinkage that minimises the expected squared error; (covariance, shrinkage)."""
    sample, shrinkage, mu = _ledoit_wolf(centered.astype(np.float64))
    return (1 - shrinkage) * sample + shrinkage * mu * np.eye(len(sample)), shrinkage


def _ledoit_wolf(x: np.ndarray) -> tuple[np.ndarray, float, float]:
    """(sample covariance, shrinkage, mu) of `x` [n, D], for shrunk_covariance."""
    n, d = x.shape
    sample = x.T @ x / n
    mu = float(np.trace(sample)) / d
    squares = x**2
    spread = float(np.sum(sample**2))  # sum of the squared entries of the sample covariance
    beta = (float(np.sum(squares.T @ squares)) / n - spread) / (d * n)
    delta = (spread - 2 * mu * float(np.trace(sample)) + d * mu**2) / d
    beta = min(beta, delta)
    shrinkage = 0.0 if delta <= 0 else float(np.clip(beta / delta, 0.0, 1.0))
    return sample, shrinkage, mu


def _inverse_sqrt(x: np.ndarray, shrinkage: float, mu: float) -> np.ndarray:
    """W = C^(-1/2) of the shrunk covariance C = (1 - s) x'x / n + s mu I of `x` [n, D], from
    the thin SVD of x: C's eigenvectors are x's right singular vectors (eigenvalues
    (1 - s) sigma^2 / n + s mu) and every direction orthogonal to them (eigenvalue s mu). With
    fewer images than features (few-shot training, 1280-wide features) this is an n x D
    decomposition instead of a D x D eigh: seconds less per training."""
    n, d = x.shape
    _, sigma, vt = np.linalg.svd(x, full_matrices=False)
    values = (1 - shrinkage) * sigma**2 / n + shrinkage * mu
    rest = shrinkage * mu  # the directions along which no image varies
    floor = max(max(float(values.max()), rest) * 1e-6, 1e-12)  # a flat one: no division by 0
    inverse, inverse_rest = 1 / np.sqrt(np.maximum(values, floor)), 1 / math.sqrt(max(rest, floor))
    return inverse_rest * np.eye(d) + (vt.T * (inverse - inverse_rest)) @ vt


def fit_mahalanobis(features: np.ndarray, labels: np.ndarray) -> MahalanobisScore:
    """The score layer for `features` [n, D] of classes `labels` [n]."""
    features = features.astype(np.float64)
    classes = np.unique(labels)
    means = np.stack([features[labels == c].mean(axis=0) for c in classes])
    centered = features - means[np.searchsorted(classes, labels)]
    _, shrinkage, mu = _ledoit_wolf(centered)
    transform = _inverse_sqrt(centered, shrinkage, mu)
    offset = features.mean(axis=0)
    return MahalanobisScore(offset, transform, (means - offset) @ transform, name="ood_score")


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
    """A fitted score layer and its threshold: ood_score <= threshold is in distribution.
    `calibration_count`: how many scores the threshold came from (validation images and
    their augmented views)."""

    method: str
    threshold: float
    percentile: float
    layer: keras.layers.Layer
    calibration_count: int = 0

    def manifest(self) -> dict[str, object]:
        """What graft.json records of it."""
        return {"method": self.method, "threshold": self.threshold, "percentile": self.percentile}


def fit_detector(
    train: np.ndarray,
    train_labels: np.ndarray,
    val: np.ndarray,
    percentile: float = PERCENTILE,
    val_views: Sequence[np.ndarray] = (),
) -> tuple[OodDetector, np.ndarray]:
    """The score fitted on the training features, thresholded at the conformal `percentile`
    of the validation features' scores and of their augmented views' (`val_views`, [n, D]
    each); (detector, the validation images' own scores)."""
    if len(val) == 0:
        raise ValueError("the out-of-distribution threshold needs validation images")
    layer = fit_mahalanobis(train, train_labels)
    val_scores = scores(layer, val)
    # The augmented views stand for real traffic's framing and light on leaves the network
    # never trained on: more unseen scores, so the percentile rests on more than the top 2-3
    # of a few hundred validation images (decision 57).
    calibration = np.concatenate([val_scores, *(scores(layer, view) for view in val_views)])
    threshold = conformal_quantile(calibration, percentile)
    detector = OodDetector(MAHALANOBIS, threshold, percentile, layer, len(calibration))
    return detector, val_scores


def conformal_quantile(values: np.ndarray, percentile: float) -> float:
    """The ceil((n + 1) * percentile / 100)-th smallest of `values` (the largest when that
    rank is past n): a new value drawn like them lies above it with probability at most
    1 - percentile / 100 (split conformal prediction; Vovk et al., 2005)."""
    ordered = np.sort(np.asarray(values, np.float64))
    rank = math.ceil((len(ordered) + 1) * percentile / 100)
    return float(ordered[min(rank, len(ordered)) - 1])


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
    """What metrics.json records: the method, the threshold and how many scores it came from,
    the share of validation and test images flagged, and their scores (4 significant digits)
    for the report's histogram."""

    def flagged(values: np.ndarray) -> float | None:
        return round(float(np.mean(values > detector.threshold)), 5) if len(values) else None

    return {
        **detector.manifest(),
        "calibration_count": detector.calibration_count,
        "validation_flagged_rate": flagged(val_scores),
        "test_flagged_rate": flagged(test_scores),
        "validation_scores": _rounded(val_scores),
        "test_scores": _rounded(test_scores),
    }

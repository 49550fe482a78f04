"""Temperature scaling: scores that mean what they say ("0.9" right 9 times in 10).

One scalar T is fitted on the validation split by minimising the negative log-likelihood of
softmax(logits / T) (Guo et al., 2017, "On Calibration of Modern Neural Networks"). It changes
no prediction's top-1 (dividing every logit by the same positive T keeps their order), so
accuracy is unchanged. The classifier outputs probabilities, and log(p) is the logits up to a
per-image constant, which softmax ignores: softmax(log(p) / T) == softmax(logits / T). The
calibrated model is therefore the trained one with that step appended, exported as it is.
"""

import math

import keras
import numpy as np

ECE_BINS = 15
_LOG_T_RANGE = (math.log(0.05), math.log(20.0))
_SEARCH_STEPS = 60  # golden-section steps: the bracket shrinks to 0.618**60 of its width
_FLOOR = 1e-12  # log(0) guard: a probability float32 rounded to zero


def reliability(
    probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS
) -> list[dict[str, float]]:
    """Per equal-width confidence bin that holds images: its mean confidence, its accuracy
    and its share of the images (the reliability diagram's bars)."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    return [
        {
            "low": float(edges[b]),
            "confidence": float(confidence[which == b].mean()),
            "accuracy": float(correct[which == b].mean()),
            "share": float((which == b).mean()),
        }
        for b in range(bins)
        if (which == b).any()
    ]


def expected_calibration_error(
    probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS
) -> float:
    """Mean |accuracy - confidence| over equal-width confidence bins, weighted by their size."""
    rows = reliability(probabilities, labels, bins)
    return float(sum(row["share"] * abs(row["accuracy"] - row["confidence"]) for row in rows))


def scale(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log(p) / T), row by row, in float64 for the fit."""
    logits = np.log(np.maximum(probabilities.astype(np.float64), _FLOOR)) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    exp = np.exp(logits)
    return exp / exp.sum(axis=1, keepdims=True)


def fit_temperature(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """The T in [0.05, 20] that minimises the validation NLL (convex in 1/T: one minimum)."""

    def nll(log_t: float) -> float:
        scaled = scale(probabilities, math.exp(log_t))
        return float(-np.log(np.maximum(scaled[np.arange(len(labels)), labels], _FLOOR)).mean())

    low, high = _LOG_T_RANGE
    ratio = (math.sqrt(5) - 1) / 2
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    fa, fb = nll(a), nll(b)
    for _ in range(_SEARCH_STEPS):
        if fa < fb:
            high, b, fb = b, a, fa
            a = high - ratio * (high - low)
            fa = nll(a)
        else:
            low, a, fa = a, b, fb
            b = low + ratio * (high - low)
            fb = nll(b)
    return math.exp((low + high) / 2)


@keras.saving.register_keras_serializable(package="graft")
class TemperatureScaling(keras.layers.Layer):
    """Probabilities -> softmax(log(p) / T): the fitted temperature, inside the model."""

    def __init__(self, temperature: float, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.temperature = float(temperature)

    def call(self, probabilities: keras.KerasTensor) -> keras.KerasTensor:
        logits = keras.ops.log(keras.ops.maximum(probabilities, _FLOOR))
        return keras.ops.softmax(logits / self.temperature, axis=-1)

    def get_config(self) -> dict[str, object]:
        return {**super().get_config(), "temperature": self.temperature}


def calibrated(model: keras.Model, temperature: float) -> keras.Model:
    """`model` (pixels -> probabilities) with the temperature applied to its output."""
    outputs = TemperatureScaling(temperature, name="temperature")(model.outputs[0])
    return keras.Model(model.inputs[0], outputs, name=f"{model.name}_calibrated")

"""Temperature scaling: the fit finds a known temperature, and the calibrated model exports."""

from pathlib import Path

import numpy as np
import pytest
from support.exports import make_tiny_model

from training.calibration import (
    calibrated,
    expected_calibration_error,
    fit_temperature,
    scale,
)


def _overconfident(true_temperature: float, count: int = 20000, classes: int = 4, seed: int = 0):
    """Labels drawn from softmax(z / T); the model reports softmax(z): overconfident if T > 1."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, size=(count, classes))
    truth = scale(_softmax(logits), true_temperature)
    labels = np.array([rng.choice(classes, p=row) for row in truth])
    return _softmax(logits), labels


def _softmax(logits: np.ndarray) -> np.ndarray:
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


def test_ece_is_zero_for_calibrated_scores_and_large_for_overconfident_ones() -> None:
    probabilities, labels = _overconfident(1.0)
    assert expected_calibration_error(probabilities, labels) < 0.02
    overconfident, labels = _overconfident(2.5)
    assert expected_calibration_error(overconfident, labels) > 0.1


def test_ece_of_a_hand_computed_case() -> None:
    # Two bins used: confidence 0.95 (right 1 of 2) and 0.55 (right 2 of 2).
    probabilities = np.array([[0.95, 0.05], [0.95, 0.05], [0.55, 0.45], [0.45, 0.55]])
    labels = np.array([0, 1, 0, 1])
    expected = 0.5 * abs(0.5 - 0.95) + 0.5 * abs(1.0 - 0.55)
    assert expected_calibration_error(probabilities, labels) == pytest.approx(expected)


@pytest.mark.parametrize("true_temperature", [0.6, 2.5])
def test_the_fit_recovers_the_temperature_and_lowers_the_ece(true_temperature: float) -> None:
    probabilities, labels = _overconfident(true_temperature)
    temperature = fit_temperature(probabilities, labels)
    assert temperature == pytest.approx(true_temperature, rel=0.08)
    after = scale(probabilities, temperature)
    assert expected_calibration_error(after, labels) < 0.02
    assert (after.argmax(axis=1) == probabilities.argmax(axis=1)).all()  # accuracy unchanged


def test_the_calibrated_model_applies_the_temperature_and_serves_on_onnx(tmp_path: Path) -> None:
    from service.runtime.loaded_model import AGREEMENT_TOLERANCE, LoadedModel, _warmup_images
    from service.runtime.networks import Engine
    from service.store.repository import ModelRepository
    from training.export import export_model

    model = make_tiny_model(3)
    images = np.random.default_rng(1).uniform(0, 255, (6, 32, 32, 3)).astype(np.float32)
    raw = np.asarray(model(images))
    hot = calibrated(model, 0.5)
    np.testing.assert_allclose(np.asarray(hot(images)), scale(raw, 0.5), atol=1e-5)

    export = export_model(
        hot, tmp_path / "export", labels=["r", "g", "b"], image_size=32, backbone="tiny-cnn"
    )
    repository = ModelRepository(tmp_path / "models")
    repository.publish(export, "hot")
    fast = LoadedModel.load(repository, "hot", 1, Engine("onnxruntime", 1))
    reference = LoadedModel.load(repository, "hot", 1)
    warm = _warmup_images(32)
    assert np.abs(fast.predict(warm) - reference.predict(warm)).max() <= AGREEMENT_TOLERANCE

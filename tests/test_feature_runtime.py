"""The feature cache on the accelerated runtime: the frozen backbone converted to ONNX and run
by ONNX Runtime must fill the cache with what TensorFlow computes, on real (tiny) images; and
where no accelerated runtime can run it, `auto` falls back to TensorFlow while a named runtime
is an error."""

import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from training_images import make_dataset

from service.errors import RejectedModel
from service.runtime.networks import ONNXRUNTIME, TENSORFLOW, RuntimeUnavailable
from training.augment import AugmentConfig, build_augmenter
from training.backbones import get_backbone
from training.evaluate import embed_keras, predict_keras
from training.feature_cache import Cached, extract
from training.fit import fit
from training.fit_config import FitConfig
from training.model import Classifier, build_classifier, cut_base
from training.progress import Reporter
from training.scan import scan
from training.split import Split, split

SIZE = 32
QUIET = Reporter(quiet=True)


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> Split:
    root = make_dataset(tmp_path_factory.mktemp("shapes"), per_class=6)
    dataset = scan(root, tmp_path_factory.mktemp("work"))
    return split(dataset, seed=0, val=0.2, test=0.0)


@pytest.fixture(scope="module")
def classifier() -> Classifier:
    base = get_backbone("efficientnet_lite0").build(image_size=SIZE)
    return build_classifier(base, 3, image_size=SIZE, backbone="efficientnet_lite0")


@pytest.fixture
def no_accelerated_runtime(monkeypatch: pytest.MonkeyPatch) -> None:
    """ONNX Runtime and OpenVINO as if not installed: a None entry in sys.modules is what
    Python's import system reports as "no such module" (find_spec None, import fails)."""
    for module in ("onnxruntime", "openvino"):
        monkeypatch.setitem(sys.modules, module, None)


def _extract(frozen: keras.Model, classifier: Classifier, parts: Split, runtime: str) -> Cached:
    """Two views (the image + one augmented), with an augmenter seeded afresh, so two calls
    see the very same pixels."""
    config = FitConfig(batch_size=8, views=2, runtime=runtime)
    augment = build_augmenter(AugmentConfig(), seed=0)
    return extract(frozen, classifier, parts.train, parts.val, config, augment, QUIET)


def _assert_same_cache(got: Cached, want: Cached) -> None:
    assert got.train.shape == want.train.shape and got.train.shape[0] == 2
    scale = max(1.0, float(np.abs(want.train).max()))
    np.testing.assert_allclose(got.train, want.train, rtol=0, atol=1e-4 * scale)
    np.testing.assert_allclose(got.val, want.val, rtol=0, atol=1e-4 * scale)
    np.testing.assert_array_equal(got.train_labels, want.train_labels)
    np.testing.assert_array_equal(got.val_labels, want.val_labels)


@pytest.mark.parametrize("part", ["trunk", "pooled"])
def test_accelerated_cache_matches_tensorflow(
    classifier: Classifier, parts: Split, part: str
) -> None:
    """Both things the cache holds: the activation entering the top layers (the default) and
    the pooled features (when no single tensor crosses the cut)."""
    trunk, _ = cut_base(classifier.base, 20)
    frozen = trunk if part == "trunk" else classifier.features
    on_tensorflow = _extract(frozen, classifier, parts, TENSORFLOW)
    accelerated = _extract(frozen, classifier, parts, ONNXRUNTIME)

    assert (accelerated.runtime, on_tensorflow.runtime) == (ONNXRUNTIME, TENSORFLOW)
    assert on_tensorflow.agreement is None
    assert accelerated.agreement is not None and accelerated.agreement < 1e-3
    assert not np.allclose(accelerated.train[0], accelerated.train[1])  # view 2 is augmented
    _assert_same_cache(accelerated, on_tensorflow)


def test_auto_takes_onnxruntime_when_installed(classifier: Classifier, parts: Split) -> None:
    config = FitConfig(epochs=1, fine_tune_epochs=1, batch_size=8, runtime="auto")
    result = fit(classifier, parts.train, parts.val, config, None, QUIET)
    assert result.feature_runtime == ONNXRUNTIME
    assert result.training_info()["feature_max_abs_diff"] < 1e-3


@pytest.mark.parametrize("fine_tune_epochs", [1, 0])
def test_predict_follows_the_trained_model(
    classifier: Classifier, parts: Split, fine_tune_epochs: int
) -> None:
    """After training, the frozen part on ONNX Runtime + the rest on TensorFlow gives the
    Keras model's probabilities: phase 2 on cached activations (1), or the head alone (0)."""
    config = FitConfig(epochs=1, fine_tune_epochs=fine_tune_epochs, batch_size=8)
    result = fit(classifier, parts.train, parts.val, config, None, QUIET)
    assert result.predict is not None and result.feature_runtime == ONNXRUNTIME
    got = result.predict(parts.val, QUIET)
    want = predict_keras(classifier, parts.val, 8, QUIET)
    assert got.shape == want.shape == (len(parts.val), 3)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    # The trained model's pooled features (what the OOD score is fitted on): from the cache
    # after phase 2 (`trained`) and in one pass with the probabilities (`embed`).
    assert result.embed is not None and result.trained is not None
    pooled, probabilities = result.embed(parts.val, QUIET)
    want_pooled, want_probabilities = embed_keras(classifier, parts.val, 8, QUIET)
    np.testing.assert_allclose(probabilities, want_probabilities, rtol=0, atol=1e-5)
    np.testing.assert_allclose(pooled, want_pooled, rtol=0, atol=1e-4)
    np.testing.assert_allclose(result.trained.val, want_pooled, rtol=0, atol=1e-4)
    assert result.trained.train.shape == (len(parts.train), want_pooled.shape[1])
    assert result.trained.train_labels.tolist() == [s.label for s in parts.train]
    # An augmented view of each image (the OOD threshold's extra scores), as Keras computes
    # it from the same pixels (an augmenter seeded afresh for each).
    view, _ = result.embed(parts.val, QUIET, build_augmenter(AugmentConfig(), seed=3))
    want_view, _ = embed_keras(classifier, parts.val, 8, QUIET, build_augmenter(AugmentConfig(), 3))
    np.testing.assert_allclose(view, want_view, rtol=0, atol=1e-4)
    assert not np.allclose(view, pooled, atol=1e-3)


def test_no_predictor_when_the_frozen_part_trains_on_pixels(
    classifier: Classifier, parts: Split
) -> None:
    config = FitConfig(epochs=1, fine_tune_epochs=1, batch_size=8, cache_features=False)
    result = fit(classifier, parts.train, parts.val, config, None, QUIET)
    assert result.predict is None and result.feature_runtime is None
    classifier.base.trainable = False


@pytest.mark.usefixtures("no_accelerated_runtime")
def test_auto_falls_back_to_tensorflow_without_an_accelerated_runtime(
    classifier: Classifier, parts: Split
) -> None:
    config = FitConfig(epochs=1, fine_tune_epochs=1, batch_size=8, runtime="auto")
    result = fit(classifier, parts.train, parts.val, config, None, QUIET)
    assert result.feature_runtime == TENSORFLOW
    assert result.training_info() == {"feature_runtime": TENSORFLOW, "feature_max_abs_diff": None}
    assert result.phase2 is not None and len(result.phase2.history["loss"]) == 1


@pytest.mark.usefixtures("no_accelerated_runtime")
def test_a_named_runtime_that_is_not_installed_is_an_error(
    classifier: Classifier, parts: Split
) -> None:
    trunk, _ = cut_base(classifier.base, 20)
    with pytest.raises(RuntimeUnavailable, match="onnxruntime package is not installed"):
        _extract(trunk, classifier, parts, ONNXRUNTIME)


class _PythonOp(keras.layers.Layer):
    """A Python function in the graph: tf2onnx writes it as a PyFunc node, which no ONNX
    runtime can load."""

    def call(self, x: tf.Tensor) -> tf.Tensor:
        doubled = tf.numpy_function(lambda a: a * 2, [x], tf.float32)
        return tf.ensure_shape(doubled, x.shape)


class _Noise(keras.layers.Layer):
    """Random noise: TensorFlow's and ONNX Runtime's generators draw different numbers, so
    the two runtimes really disagree on this network."""

    def call(self, x: tf.Tensor) -> tf.Tensor:
        return x + tf.random.uniform(tf.shape(x), 0.0, 100.0)


def _frozen_with(layer: keras.layers.Layer) -> keras.Model:
    pixels = keras.Input((SIZE, SIZE, 3))
    return keras.Model(pixels, keras.layers.GlobalAveragePooling2D()(layer(pixels)))


@pytest.mark.parametrize(
    ("layer", "error", "message"),
    [
        (_PythonOp, RejectedModel, "onnxruntime cannot load"),
        (_Noise, RuntimeUnavailable, "onnxruntime disagrees with TensorFlow"),
    ],
)
def test_a_network_the_runtime_cannot_run_falls_back_under_auto_only(
    classifier: Classifier,
    parts: Split,
    layer: type[keras.layers.Layer],
    error: type[Exception],
    message: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    frozen = _frozen_with(layer())
    with pytest.raises(error, match=message):
        _extract(frozen, classifier, parts, ONNXRUNTIME)
    config = FitConfig(batch_size=8, views=1, runtime="auto")
    cached = extract(frozen, classifier, parts.train, parts.val, config, None, Reporter())
    assert (cached.runtime, cached.agreement) == (TENSORFLOW, None)
    assert cached.train.shape == (1, len(parts.train), 3)
    warning = " ".join(capsys.readouterr().err.split())  # the console wraps long lines
    assert "warning:" in warning and message in warning and "runs on TensorFlow" in warning

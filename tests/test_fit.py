"""Two-phase fit on a real pretrained backbone (EfficientNet-Lite0 at 32 px) and tiny images."""

from pathlib import Path

import keras
import numpy as np
import pytest
from training_images import make_dataset

from training.backbones import get_backbone
from training.feature_cache import extract
from training.fit import fit, train_cached, train_pixels
from training.fit_config import FitConfig
from training.model import Classifier, build_classifier, cut_base, unfreeze_top
from training.progress import Reporter
from training.scan import scan
from training.split import Split, split

SIZE = 32


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> Split:
    root = make_dataset(tmp_path_factory.mktemp("shapes"), per_class=6)
    dataset = scan(root, tmp_path_factory.mktemp("work"))
    return split(dataset, seed=0, val=0.2, test=0.0)


@pytest.fixture(scope="module")
def base() -> keras.Model:
    return get_backbone("efficientnet_lite0").build(image_size=SIZE)


def _classifier(base: keras.Model, dropout: float = 0.0) -> Classifier:
    return build_classifier(
        base, 3, image_size=SIZE, backbone="efficientnet_lite0", dropout=dropout
    )


def test_head_layers_are_shared_between_the_two_graphs(base: keras.Model) -> None:
    classifier = _classifier(base)
    assert classifier.head.get_layer("probabilities") is classifier.model.get_layer("probabilities")
    assert classifier.features.get_layer(base.name) is classifier.model.get_layer(base.name)


def _assert_same_run(cached: dict, uncached: dict) -> None:
    for key in ("loss", "val_loss", "accuracy"):
        np.testing.assert_allclose(cached[key], uncached[key], rtol=1e-4, atol=1e-5)
    assert cached["loss"][-1] < cached["loss"][0]  # it did learn something


def _assert_same_weights(
    got: list[np.ndarray], want: list[np.ndarray], adam_steps_of: float = 0.0
) -> None:
    """Equal within float32 noise. With `adam_steps_of` (a learning rate), up to 0.5 % of the
    elements may differ by up to 10 of its steps: Adam moves a weight whose gradient is almost
    zero by about the learning rate whatever the gradient's size, so where the two paths'
    rounding differs (AVX-512 kernels sum batches of other shapes in another order) such a
    weight may move the other way. A path that computed something else would differ in far
    more elements than that."""
    for a, b in zip(got, want, strict=True):
        close = np.isclose(a, b, rtol=1e-4, atol=1e-5)
        if adam_steps_of == 0.0 or close.all():
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
            continue
        assert np.mean(~close) <= 0.005, f"{np.mean(~close):.2%} of {a.shape} differ"
        np.testing.assert_allclose(a, b, rtol=0, atol=10 * adam_steps_of)


def test_cached_phase1_matches_uncached_phase1(base: keras.Model, parts: Split) -> None:
    """Same seed, same initial head, no augmentation, no dropout: the cached path must follow
    the same trajectory (per-epoch losses and final weights) as training on pixels."""
    classifier = _classifier(base)
    initial = classifier.head.get_weights()
    config = FitConfig(epochs=2, batch_size=8, patience=5, seed=0)
    quiet = Reporter(quiet=True)

    keras.utils.set_random_seed(0)
    features = extract(classifier.features, classifier, parts.train, parts.val, config, None, quiet)
    cached = train_cached(
        classifier.head, features, parts.train, config, quiet, phase=1, epochs=2, learning_rate=1e-3
    )
    cached_weights = classifier.head.get_weights()
    classifier.head.set_weights(initial)
    keras.utils.set_random_seed(0)
    uncached = train_pixels(
        classifier,
        parts.train,
        parts.val,
        config,
        None,
        quiet,
        phase=1,
        epochs=2,
        learning_rate=1e-3,
    )

    _assert_same_run(cached.history, uncached.history)
    _assert_same_weights(classifier.head.get_weights(), cached_weights)
    assert not np.allclose(cached_weights[0], initial[0])


def test_cached_phase2_matches_uncached_phase2(base: keras.Model, parts: Split) -> None:
    """Fine-tuning the top layers on cached activations == fine-tuning on pixels."""
    classifier = _classifier(base)
    layers = 20
    trunk, top = cut_base(base, layers)
    initial = classifier.model.get_weights()
    config = FitConfig(epochs=1, fine_tune_layers=layers, batch_size=8, patience=5)
    quiet = Reporter(quiet=True)
    unfreeze_top(base, layers)

    keras.utils.set_random_seed(0)
    activations = extract(trunk, classifier, parts.train, parts.val, config, None, quiet)
    inputs = keras.Input(activations.train.shape[2:])
    model = keras.Model(inputs, classifier.head(classifier.pool(top(inputs, training=False))))
    cached = train_cached(
        model, activations, parts.train, config, quiet, phase=2, epochs=2, learning_rate=1e-3
    )
    cached_weights = classifier.model.get_weights()
    classifier.model.set_weights(initial)
    keras.utils.set_random_seed(0)
    uncached = train_pixels(
        classifier,
        parts.train,
        parts.val,
        config,
        None,
        quiet,
        phase=2,
        epochs=2,
        learning_rate=1e-3,
    )
    base.trainable = False

    _assert_same_run(cached.history, uncached.history)
    _assert_same_weights(classifier.model.get_weights(), cached_weights, adam_steps_of=1e-3)


def test_cut_base_reproduces_the_base(base: keras.Model) -> None:
    trunk, top = cut_base(base, 20)
    assert top.layers[-1] is base.layers[-1]
    pixels = np.random.default_rng(1).uniform(0, 255, (2, SIZE, SIZE, 3)).astype("float32")
    np.testing.assert_allclose(top(trunk(pixels)), base(pixels), atol=1e-5)
    assert cut_base(base, 0) is None


def _snapshot(layers: list[keras.layers.Layer]) -> list[tuple[keras.Variable, np.ndarray]]:
    return [(w, w.numpy().copy()) for layer in layers for w in layer.weights]


def _changed(snapshot: list[tuple[keras.Variable, np.ndarray]]) -> list[bool]:
    return [not np.array_equal(value, w.numpy()) for w, value in snapshot]


def test_two_phases_fine_tune_only_the_top_layers(
    base: keras.Model, parts: Split, tmp_path: Path
) -> None:
    classifier = _classifier(base, dropout=0.2)
    layers = 20  # a cut with a single tensor crossing it: phase 2 trains on cached activations
    below, top = base.layers[:-layers], base.layers[-layers:]
    is_bn = lambda layer: isinstance(layer, keras.layers.BatchNormalization)  # noqa: E731
    frozen = _snapshot(below)
    top_plain = _snapshot([layer for layer in top if not is_bn(layer)])
    top_bn = _snapshot([layer for layer in top if is_bn(layer)])
    assert top_plain and top_bn
    config = FitConfig(
        epochs=2, fine_tune_epochs=2, fine_tune_layers=layers, batch_size=8, checkpoint_dir=tmp_path
    )
    result = fit(classifier, parts.train, parts.val, config, None, Reporter(quiet=True))

    assert result.phase2 is not None and len(result.phase2.history["loss"]) == 2
    assert result.phase1.extract_seconds > 0 and len(result.phase1.epoch_seconds) == 2
    assert not any(_changed(frozen))  # below the cut: untouched
    assert any(_changed(top_plain))  # the unfrozen top learned
    assert not any(_changed(top_bn))  # BatchNorm stays frozen
    restored = keras.models.load_model(tmp_path / "phase2_top.keras")
    activation = np.random.default_rng(0).normal(size=(2, *restored.input_shape[1:]))
    np.testing.assert_allclose(restored.predict(activation, verbose=0).sum(axis=1), 1.0, rtol=1e-5)
    assert (tmp_path / "phase1_head.keras").is_file()


def test_unfreeze_top_keeps_batchnorm_frozen(base: keras.Model) -> None:
    assert unfreeze_top(base, 0) == 0
    assert unfreeze_top(base, 20) > 0
    trainable = [layer for layer in base.layers if layer.trainable]
    assert trainable and all(
        not isinstance(layer, keras.layers.BatchNormalization) for layer in trainable
    )
    assert all(layer in base.layers[-20:] for layer in trainable)
    base.trainable = False

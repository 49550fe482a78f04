"""Backbones: the offline EfficientNet-Lite0 sees real photos correctly, the registry builds
flat feature extractors, and the conversion cache makes later builds fast."""

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import keras
import numpy as np
import pytest
import skimage.data

from training.backbones import (
    BACKBONES,
    efficientnet_lite0,
    get_backbone,
    imagenet_labels,
)
from training.backbones.layers import CaffePreprocess
from training.preprocess import resize_pixels

CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("graft-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GRAFT_CACHE_DIR", str(path))
        yield path


@pytest.fixture(scope="module")
def lite0(cache_dir: Path) -> keras.Model:
    """The ImageNet classifier; this first build converts the packaged checkpoint."""
    return efficientnet_lite0(include_top=True, weights="imagenet")


def _photo(image: np.ndarray) -> np.ndarray:
    return resize_pixels(image[None], 224).numpy()


def _assert_same_weights(a: keras.Model, b: keras.Model) -> None:
    assert len(a.weights) == len(b.weights)
    for x, y in zip(a.weights, b.weights, strict=True):
        np.testing.assert_array_equal(x.numpy(), y.numpy(), err_msg=x.path)


def test_chelsea_is_a_cat(lite0: keras.Model) -> None:
    probabilities = lite0.predict(_photo(skimage.data.chelsea()), verbose=0)[0]
    top = int(np.argmax(probabilities))
    assert top in CATS, f"top-1 is {top} ({imagenet_labels()[top]})"
    assert probabilities[top] > 0.5
    assert probabilities.sum() == pytest.approx(1.0, abs=1e-4)


def test_coffee_is_espresso(lite0: keras.Model) -> None:
    probabilities = lite0.predict(_photo(skimage.data.coffee()), verbose=0)[0]
    assert int(np.argmax(probabilities)) == ESPRESSO


def test_feature_extractor_feeds_the_same_head(lite0: keras.Model, cache_dir: Path) -> None:
    features = efficientnet_lite0(include_top=False, pooling="avg")
    assert features.output.shape == (None, 1280)
    image = _photo(skimage.data.chelsea())
    expected = keras.Model(lite0.input, lite0.get_layer("avg_pool").output)(image)
    np.testing.assert_allclose(features(image), expected, rtol=1e-5, atol=1e-5)


def test_cached_build_is_fast_and_identical(lite0: keras.Model, cache_dir: Path) -> None:
    cached = list(cache_dir.glob("efficientnet_lite0-*.weights.h5"))
    assert len(cached) == 1, "the first build should leave exactly one converted file"
    written = cached[0].stat().st_mtime_ns
    start = time.perf_counter()
    again = efficientnet_lite0(include_top=True, weights="imagenet")
    seconds = time.perf_counter() - start
    assert cached[0].stat().st_mtime_ns == written, "the cached file was converted again"
    print(f"efficientnet_lite0 build from cached weights: {seconds:.2f} s")
    assert seconds < 30  # about 1-2 s alone; loose because the CPU is shared
    _assert_same_weights(again, lite0)


def test_unreadable_cache_is_converted_again(lite0: keras.Model, cache_dir: Path) -> None:
    (cached,) = cache_dir.glob("efficientnet_lite0-*.weights.h5")
    cached.write_bytes(b"not an HDF5 file")
    rebuilt = efficientnet_lite0(include_top=True, weights="imagenet")
    _assert_same_weights(rebuilt, lite0)
    assert cached.read_bytes()[:8] == b"\x89HDF\r\n\x1a\n"


def test_lite0_loads_a_weights_file_path(lite0: keras.Model, cache_dir: Path) -> None:
    (converted,) = cache_dir.glob("efficientnet_lite0-*.weights.h5")
    _assert_same_weights(efficientnet_lite0(weights=converted), lite0)


def test_imagenet_labels_in_standard_order() -> None:
    labels = imagenet_labels()
    assert len(labels) == 1000 and len(set(labels)) == 1000
    assert (labels[0], labels[281], labels[967]) == ("tench", "tabby", "espresso")
    assert labels[134] != labels[517]  # the two "crane" classes stay distinguishable


SMALL = 32  # the smallest size every application accepts; keeps these builds cheap


@pytest.fixture(scope="module")
def small_backbones() -> dict[str, keras.Model]:
    """Every registry entry, randomly initialised, built once for the tests below."""
    return {name: spec.build(weights=None, image_size=SMALL) for name, spec in BACKBONES.items()}


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_backbone_is_a_flat_feature_extractor(
    name: str, small_backbones: dict[str, keras.Model]
) -> None:
    spec, model = get_backbone(name), small_backbones[name]
    assert model.input.shape == (None, SMALL, SMALL, 3)
    assert model.output.shape == (None, 1, 1, spec.feature_dim)
    assert not any(isinstance(layer, keras.Model | keras.layers.Lambda) for layer in model.layers)
    # Fine-tuning starts at a block's first convolution, not mid-block or in the stem.
    assert 0 < spec.fine_tune_layers < len(model.layers) // 2
    assert isinstance(model.layers[-spec.fine_tune_layers], keras.layers.Conv2D)
    pixels = np.random.default_rng(0).uniform(0, 255, (2, SMALL, SMALL, 3)).astype("float32")
    assert np.isfinite(model(pixels, training=False)).all()


def test_native_size_is_the_default() -> None:
    model = get_backbone("efficientnet_lite0").build(weights=None)
    assert model.input.shape == (None, 224, 224, 3)
    assert model.output.shape == (None, 7, 7, 1280)


# One application with a built-in layer in front, one with our registered layer.
@pytest.mark.parametrize("name", ["mobilenet_v2", "resnet50"])
def test_keras_application_loads_a_local_weights_file(
    name: str, small_backbones: dict[str, keras.Model], tmp_path: Path
) -> None:
    path = tmp_path / f"{name}.weights.h5"
    small_backbones[name].save_weights(path)
    reloaded = get_backbone(name).build(weights=path, image_size=SMALL)
    _assert_same_weights(reloaded, small_backbones[name])


def test_failed_imagenet_download_says_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    # Keras's cache: $KERAS_HOME, else ~/.keras, else /tmp/.keras when home is read-only.
    homes = [os.environ.get("KERAS_HOME", ""), Path.home() / ".keras", "/tmp/.keras"]
    cached = [f for h in homes if h for f in Path(h, "models").glob("mobilenet_v2_*_no_top.h5")]
    if cached:
        pytest.skip("MobileNetV2 ImageNet weights are already in Keras's cache: no download")
    # A proxy on a closed port makes Keras's real download fail fast, online or not.
    for var in ("https_proxy", "HTTPS_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    with pytest.raises(RuntimeError, match=r"MobileNetV2.*offline, use the efficientnet_lite0"):
        get_backbone("mobilenet_v2").build(weights="imagenet", image_size=SMALL)


def test_missing_weights_file_says_what_to_pass(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"'imagenet'.*None"):
        get_backbone("mobilenet_v2").build(weights=tmp_path / "nope.weights.h5", image_size=32)
    with pytest.raises(FileNotFoundError, match=r"'imagenet', None"):
        efficientnet_lite0(weights=tmp_path / "nope.weights.h5")


@pytest.mark.parametrize(
    ("name", "reference"),
    [
        ("mobilenet_v2", keras.applications.mobilenet_v2.preprocess_input),
        ("resnet50", keras.applications.resnet50.preprocess_input),
    ],
)
def test_normalisation_layer_matches_keras_preprocess_input(
    name: str,
    reference: Callable[[np.ndarray], np.ndarray],
    small_backbones: dict[str, keras.Model],
) -> None:
    normalise = small_backbones[name].layers[1]
    pixels = np.random.default_rng(1).uniform(0, 255, (2, SMALL, SMALL, 3)).astype("float32")
    np.testing.assert_allclose(normalise(pixels), reference(pixels.copy()), rtol=1e-5, atol=1e-4)


def test_caffe_layer_round_trips_through_its_config() -> None:
    layer = CaffePreprocess(name="caffe_preprocess")
    config = keras.saving.serialize_keras_object(layer)
    assert isinstance(keras.saving.deserialize_keras_object(config), CaffePreprocess)


def test_unknown_backbone_lists_the_valid_names() -> None:
    with pytest.raises(ValueError, match=r"unknown backbone 'nope'.*efficientnet_lite0"):
        get_backbone("nope")


def test_bad_arguments_are_rejected_clearly() -> None:
    with pytest.raises(ValueError, match="image_size must be at least 32"):
        get_backbone("efficientnet_lite0").build(weights=None, image_size=16)
    with pytest.raises(ValueError, match="pooling must be"):
        efficientnet_lite0(include_top=False, weights=None, pooling="mean")

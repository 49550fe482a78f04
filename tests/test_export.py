"""The exported SavedModel stands alone and computes what the Keras model computes."""

import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from support.exports import TINY_IMAGE_SIZE, make_tiny_model
from support.images import channel_variants, encode, random_rgb

LABELS = ["red", "green", "blue"]
TOLERANCE = 1e-5

# Runs in a fresh interpreter where importing graft's packages fails, so the SavedModel must
# carry everything (decode, resize, labels) itself.
STANDALONE = textwrap.dedent(
    """
    import json, sys
    sys.modules["training"] = None
    sys.modules["service"] = None
    import numpy as np
    import tensorflow as tf

    export_dir, inputs, outputs = sys.argv[1:]
    data = np.load(inputs, allow_pickle=False)
    loaded = tf.saved_model.load(export_dir)
    results = {}
    for key in data.files:
        if key.startswith("images:"):
            call = loaded.signatures["serving_default"](images=tf.constant([data[key].tobytes()]))
        else:
            call = loaded.signatures["serve_pixels"](pixels=tf.constant(data[key]))
        for output, value in call.items():
            value = value.numpy()
            results[f"{key}|{output}"] = value.astype("S") if value.dtype == object else value
    np.savez(outputs, **results)
    graft = sorted(m for m in sys.modules if m.split(".")[0] in ("training", "service") and
                   sys.modules[m] is not None)
    print(json.dumps({"graft_modules": graft}))
    """
)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory):
    from training.export import export_model

    model = make_tiny_model(len(LABELS))
    export_dir = tmp_path_factory.mktemp("export") / "tiny"
    export_model(
        model,
        export_dir,
        labels=LABELS,
        image_size=TINY_IMAGE_SIZE,
        backbone="tiny-cnn",
        metrics={"accuracy": 0.5},
        dataset_fingerprint="sha256:abc",
    )
    return model, export_dir


@pytest.fixture(scope="module")
def inputs() -> dict[str, np.ndarray]:
    """Encoded images (as uint8 byte arrays) and pixel batches, keyed by kind:name."""
    encoded = {
        "native.png": encode(random_rgb(TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, seed=1), "PNG"),
        "large.png": encode(random_rgb(70, 50, seed=2), "PNG"),
        **channel_variants(seed=3),
    }
    arrays = {f"images:{k}": np.frombuffer(v, np.uint8) for k, v in encoded.items()}
    arrays["pixels:native"] = np.stack(
        [random_rgb(TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, s) for s in (4, 5)]
    )
    arrays["pixels:other-size"] = np.stack([random_rgb(45, 27, s) for s in (6, 7)])
    return arrays


@pytest.fixture(scope="module")
def standalone(exported, inputs, tmp_path_factory: pytest.TempPathFactory):
    """Outputs of both signatures, computed in a subprocess that cannot import graft."""
    _, export_dir = exported
    folder = tmp_path_factory.mktemp("standalone")
    np.savez(folder / "inputs.npz", **inputs)
    script = folder / "standalone.py"
    script.write_text(STANDALONE)
    run = subprocess.run(
        [
            sys.executable,
            str(script),
            str(export_dir),
            str(folder / "inputs.npz"),
            str(folder / "out.npz"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=folder,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout.splitlines()[-1]) == {"graft_modules": []}
    with np.load(folder / "out.npz") as out:
        return {key: out[key] for key in out.files}


def _keras_probabilities(model, pixels: np.ndarray) -> np.ndarray:
    from training.preprocess import resize_pixels

    return np.asarray(model(resize_pixels(pixels, TINY_IMAGE_SIZE), training=False))


def _decoded_by_pillow(data: np.ndarray) -> np.ndarray:
    """An independent decoder: Pillow's first frame, converted to RGB (alpha dropped)."""
    with Image.open(io.BytesIO(data.tobytes())) as image:
        return np.asarray(image.convert("RGB"))[None]


def test_serving_default_matches_keras_on_the_training_decode(exported, inputs, standalone):
    from training.preprocess import decode_batch

    model, _ = exported
    seen = []
    for key in (k for k in inputs if k.startswith("images:")):
        expected = np.asarray(
            model(decode_batch(np.array([inputs[key].tobytes()]), TINY_IMAGE_SIZE))
        )
        got = standalone[f"{key}|probabilities"]
        assert got.shape == (1, len(LABELS)) and got.dtype == np.float32, key
        assert np.abs(got - expected).max() < TOLERANCE, key
        seen.append(got[0])
    assert np.ptp(np.array(seen), axis=0).max() > 1e-3, "the model must not be constant"


def test_serve_pixels_matches_keras_at_native_and_other_sizes(exported, inputs, standalone):
    model, _ = exported
    native = inputs["pixels:native"]
    # At the model's own size the resize is the identity, so this is the bare Keras model.
    direct = np.asarray(model(native.astype(np.float32), training=False))
    assert np.abs(standalone["pixels:native|probabilities"] - direct).max() < TOLERANCE
    other = inputs["pixels:other-size"]
    expected = _keras_probabilities(model, other)
    assert np.abs(standalone["pixels:other-size|probabilities"] - expected).max() < TOLERANCE


def test_every_channel_layout_decodes_like_pillow(exported, standalone):
    """Grayscale, RGBA, palette PNG, BMP and GIF (first frame) reach the model as the RGB
    pixels an independent decoder sees; JPEG is left out because decoders may round
    differently."""
    model, _ = exported
    for name, data in channel_variants(seed=3).items():
        if name.endswith(".jpg"):
            continue
        expected = _keras_probabilities(model, _decoded_by_pillow(np.frombuffer(data, np.uint8)))
        got = standalone[f"images:{name}|probabilities"]
        assert np.abs(got - expected).max() < TOLERANCE, name


def test_label_and_score_are_the_top_class(standalone):
    for key in (
        k.removesuffix("|probabilities") for k in standalone if k.endswith("|probabilities")
    ):
        probabilities = standalone[f"{key}|probabilities"]
        labels = [LABELS[i] for i in probabilities.argmax(axis=1)]
        assert [v.decode() for v in standalone[f"{key}|label"]] == labels, key
        np.testing.assert_allclose(
            standalone[f"{key}|score"], probabilities.max(axis=1), rtol=0, atol=0
        )


def test_export_writes_labels_and_a_verifiable_draft_manifest(exported):
    from service.store.manifest import Manifest, hash_tree

    _, export_dir = exported
    assert (export_dir / "assets" / "labels.txt").read_text().splitlines() == LABELS
    manifest = Manifest.read(export_dir)
    assert (manifest.name, manifest.version) == (None, None)
    assert manifest.labels == LABELS and manifest.image_size == TINY_IMAGE_SIZE
    assert manifest.backbone == "tiny-cnn" and manifest.metrics == {"accuracy": 0.5}
    assert manifest.dataset_fingerprint == "sha256:abc"
    assert {"tensorflow", "keras", "graft", "python"} <= manifest.framework.keys()
    assert manifest.files == hash_tree(export_dir) and "saved_model.pb" in manifest.files


def test_export_refuses_mismatched_labels_logits_and_a_used_folder(exported, tmp_path: Path):
    import keras

    from training.export import export_model

    model, export_dir = exported
    with pytest.raises(ValueError, match="4 labels"):
        export_model(
            model,
            tmp_path / "a",
            labels=["a", "b", "c", "d"],
            image_size=32,
            backbone="x",
        )
    with pytest.raises(ValueError, match="distinct"):
        export_model(model, tmp_path / "b", labels=["a", "a", "b"], image_size=32, backbone="x")
    logits = keras.Sequential(
        [keras.Input((32, 32, 3)), keras.layers.Flatten(), keras.layers.Dense(3)]
    )
    with pytest.raises(ValueError, match="softmax"):
        export_model(logits, tmp_path / "c", labels=LABELS, image_size=32, backbone="x")
    with pytest.raises(FileExistsError):
        export_model(model, export_dir, labels=LABELS, image_size=32, backbone="x")
    assert not list(tmp_path.iterdir()), "a failed export must leave nothing behind"

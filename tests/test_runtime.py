"""The accelerated runtimes: the ONNX file an export carries, and the versions that run on it.

Each test loads a real tiny export (support.exports) on a real runtime: ONNX Runtime, OpenVINO
or TensorFlow. A runtime that is "missing" is made unimportable for the test (sys.modules entry
None, which is how Python itself marks a module that must not import).
"""

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from support.cli import run_graft
from support.exports import make_tiny_export, make_tiny_model

from service.errors import RejectedModel
from service.runtime.loaded_model import AGREEMENT_TOLERANCE, LoadedModel, _warmup_images
from service.runtime.networks import (
    ONNXRUNTIME,
    OPENVINO,
    TENSORFLOW,
    Engine,
    RuntimeUnavailable,
    default_threads,
    engine_for,
    resolve,
)
from service.settings import GraftSettings
from service.store.layout import ONNX_FILE, PREPROCESS_SIGNATURE
from service.store.manifest import Manifest, ManifestError, hash_tree
from service.store.repository import ModelRepository

ONNX = Engine(ONNXRUNTIME, 1)


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_export(tmp_path_factory.mktemp("runtime") / "export")


@pytest.fixture
def repository(tmp_path: Path, tiny_export: Path) -> ModelRepository:
    repository = ModelRepository(tmp_path / "models")
    repository.publish(tiny_export, "tiny")
    return repository


def _version_dir(repository: ModelRepository) -> Path:
    return repository.version_dir("tiny", 1)


def _rewrite_manifest(folder: Path) -> None:
    """Re-hash the folder into its manifest, as someone who swapped a file on purpose would."""
    manifest = Manifest.read(folder)
    manifest.files = hash_tree(folder)
    if manifest.accelerated is not None:
        manifest.accelerated.sha256 = manifest.files[ONNX_FILE]
    manifest.write(folder)


def test_the_export_carries_the_network_as_onnx_and_a_preprocess_signature(
    tiny_export: Path,
) -> None:
    import tensorflow as tf

    manifest = Manifest.read(tiny_export)
    assert manifest.accelerated is not None
    assert manifest.accelerated.file == ONNX_FILE
    assert manifest.accelerated.sha256 == manifest.files[ONNX_FILE]
    assert manifest.accelerated.converter.startswith("tf2onnx ")
    assert PREPROCESS_SIGNATURE in manifest.signatures
    module = tf.saved_model.load(str(tiny_export))
    assert {"serving_default", "serve_pixels", PREPROCESS_SIGNATURE} <= set(module.signatures)
    images = _warmup_images(manifest.image_size)
    pixels = module.signatures[PREPROCESS_SIGNATURE](images=tf.constant(images))["pixels"]
    assert pixels.dtype == tf.float32
    assert pixels.shape == (len(images), manifest.image_size, manifest.image_size, 3)


def test_an_export_without_the_accelerated_file_still_publishes_and_serves(
    tmp_path: Path,
) -> None:
    from training.export import export_model

    export = export_model(
        make_tiny_model(2),
        tmp_path / "export",
        labels=["a", "b"],
        image_size=32,
        backbone="tiny-cnn",
        accelerated=False,
    )
    assert not (export / ONNX_FILE).exists()
    repository = ModelRepository(tmp_path / "models")
    version = repository.publish(export, "plain")
    model = LoadedModel.load(repository, "plain", version, ONNX)
    assert model.runtime == TENSORFLOW
    assert "graft export-onnx plain 1" in (model.runtime_note or "")


@pytest.mark.parametrize("runtime", [ONNXRUNTIME, OPENVINO])
def test_each_accelerated_runtime_serves_the_savedmodels_numbers(
    repository: ModelRepository, runtime: str
) -> None:
    fast = LoadedModel.load(repository, "tiny", 1, Engine(runtime, 1))
    reference = LoadedModel.load(repository, "tiny", 1)
    assert (fast.runtime, reference.runtime) == (runtime, TENSORFLOW)
    assert fast.runtime_note is None
    images = _warmup_images(fast.image_size)
    difference = np.abs(fast.predict(images) - reference.predict(images)).max()
    assert difference <= AGREEMENT_TOLERANCE


def test_an_accelerated_version_refuses_undecodable_images_like_tensorflow(
    repository: ModelRepository,
) -> None:
    from service.errors import InvalidImage

    model = LoadedModel.load(repository, "tiny", 1, ONNX)
    with pytest.raises(InvalidImage, match="cannot be decoded"):
        model.predict([b"not an image"])


def test_a_corrupt_onnx_file_fails_the_hash_check(repository: ModelRepository) -> None:
    path = _version_dir(repository) / ONNX_FILE
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match=r"changed: onnx/model\.onnx"):
        LoadedModel.load(repository, "tiny", 1, ONNX)


def test_a_truncated_onnx_file_with_a_matching_manifest_is_refused(
    repository: ModelRepository,
) -> None:
    folder = _version_dir(repository)
    path = folder / ONNX_FILE
    path.write_bytes(path.read_bytes()[:1000])
    _rewrite_manifest(folder)
    with pytest.raises(RejectedModel, match=r"onnxruntime cannot load model\.onnx"):
        LoadedModel.load(repository, "tiny", 1, ONNX)


def test_another_models_onnx_file_is_refused_for_disagreeing(
    repository: ModelRepository, tmp_path: Path
) -> None:
    from training.onnx_export import write_onnx

    folder = _version_dir(repository)
    other = make_tiny_model(3, steps=1)  # same shapes, other weights
    other.layers[-1].set_weights([w * 3 for w in other.layers[-1].get_weights()])
    write_onnx(other, 32, "probabilities", folder / ONNX_FILE)
    _rewrite_manifest(folder)
    with pytest.raises(RejectedModel, match="disagrees with the SavedModel"):
        LoadedModel.load(repository, "tiny", 1, ONNX)


def test_an_onnx_file_with_another_output_width_is_refused(repository: ModelRepository) -> None:
    from training.onnx_export import write_onnx

    folder = _version_dir(repository)
    write_onnx(make_tiny_model(5, steps=1), 32, "probabilities", folder / ONNX_FILE)
    _rewrite_manifest(folder)
    with pytest.raises(RejectedModel, match="is not this version's network"):
        LoadedModel.load(repository, "tiny", 1, ONNX)


def test_a_manifest_whose_accelerated_hash_disagrees_with_its_file_list_is_refused(
    repository: ModelRepository,
) -> None:
    folder = _version_dir(repository)
    text = json.loads((folder / "graft.json").read_text())
    text["accelerated"]["sha256"] = "0" * 64
    (folder / "graft.json").write_text(json.dumps(text))
    with pytest.raises(ManifestError, match="not listed with the sha256"):
        LoadedModel.load(repository, "tiny", 1, ONNX)


def test_a_runtime_that_does_not_import_leaves_the_version_on_tensorflow(
    repository: ModelRepository, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service import metrics

    def fallbacks() -> float:
        return metrics.RUNTIME_FALLBACKS.labels("tiny", ONNXRUNTIME)._value.get()

    before = fallbacks()
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now fails
    model = LoadedModel.load(repository, "tiny", 1, ONNX)
    assert model.runtime == TENSORFLOW
    assert "onnxruntime is unavailable" in (model.runtime_note or "")
    assert fallbacks() == before + 1
    images = _warmup_images(model.image_size)
    assert model.predict(images).shape == (len(images), 3)


def test_auto_takes_onnxruntime_and_tensorflow_without_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert resolve("auto") == ONNXRUNTIME
    assert resolve("tensorflow") == TENSORFLOW
    assert resolve("openvino") == OPENVINO
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert resolve("auto") == TENSORFLOW


def test_runtimes_that_cannot_be_honoured_are_refused_naming_the_setting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with pytest.raises(RuntimeUnavailable, match="GRAFT_RUNTIME='tensorrt' is not a runtime"):
        resolve("tensorrt")
    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(RuntimeUnavailable, match="GRAFT_RUNTIME=openvino but the openvino"):
        resolve("openvino")


def test_threads_per_call_share_the_cores_between_batches(tmp_path: Path) -> None:
    cores = len(os.sched_getaffinity(0))
    assert default_threads(1) == cores
    assert default_threads(cores * 4) == 1
    settings = GraftSettings(model_root=tmp_path, batch_threads=1, runtime="onnxruntime")
    assert engine_for(settings) == Engine(ONNXRUNTIME, cores)
    pinned = GraftSettings(model_root=tmp_path, runtime="tensorflow", runtime_threads=3)
    assert engine_for(pinned) == Engine(TENSORFLOW, 3)


def test_graft_serve_refuses_a_runtime_it_cannot_honour(tmp_path: Path) -> None:
    result = run_graft("serve", "--model-root", str(tmp_path), env={"GRAFT_RUNTIME": "tensorrt"})
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines == [
        "error: GRAFT_RUNTIME='tensorrt' is not a runtime; choose one of auto, onnxruntime, "
        "openvino, tensorflow"
    ]
    assert not any(tmp_path.iterdir())  # refused before the default model was installed


def _export_without_onnx(folder: Path) -> Path:
    """A tiny export as graft made them before the accelerated file."""
    from training.export import export_model

    labels = ["a", "b", "c"]
    model = make_tiny_model(3)
    return export_model(
        model, folder, labels=labels, image_size=32, backbone="tiny-cnn", accelerated=False
    )


def test_export_onnx_adds_the_network_to_an_older_version_as_a_new_version(
    tmp_path: Path,
) -> None:
    export = _export_without_onnx(tmp_path / "export")
    repository = ModelRepository(tmp_path / "models")
    repository.publish(export, "old")
    before = sorted(hash_tree(repository.version_dir("old", 1)).items())
    result = run_graft("export-onnx", "old", "1", "--model-root", str(repository.root))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "2"
    assert sorted(hash_tree(repository.version_dir("old", 1)).items()) == before
    fast = LoadedModel.load(repository, "old", 2, ONNX)
    assert fast.runtime == ONNXRUNTIME
    images = _warmup_images(32)
    original = LoadedModel.load(repository, "old", 1).predict(images)
    assert np.abs(fast.predict(images) - original).max() <= AGREEMENT_TOLERANCE

    from training.accelerate import CannotAccelerate, export_onnx

    with pytest.raises(CannotAccelerate, match=r"old v2 already has onnx/model\.onnx; serve it"):
        export_onnx(repository, "old", 2)


def test_export_onnx_of_a_rejected_version_publishes_a_rejected_copy(tmp_path: Path) -> None:
    from service.store.promotion import publish_candidate, read_promotions, stable_version
    from service.wire import GateFigures, GateResult, Promotion, PromotionState

    export = _export_without_onnx(tmp_path / "export")
    repository = ModelRepository(tmp_path / "models")
    repository.publish(export, "m")  # v1: before the gate, promoted
    figures = GateFigures(accuracy=0.4, macro_f1=0.3)
    gate = GateResult(
        source="test split", images=18, chance=0.34, max_regression=0.01,
        candidate=figures, active=GateFigures(version=1, accuracy=1.0, macro_f1=1.0),
    )  # fmt: skip
    rejected = Promotion(
        state=PromotionState.REJECTED, decided_by="gate", reason="worse than v1", gate=gate
    )
    publish_candidate(repository, export, "m", rejected)  # v2
    result = run_graft("export-onnx", "m", "2", "--model-root", str(repository.root))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "3"
    copy = read_promotions(repository, "m")[3]
    assert (copy.state, copy.decided_by, copy.gate) == (PromotionState.REJECTED, "gate", gate)
    assert copy.reason.startswith("worse than v1") and "inherited from v2" in copy.reason
    assert stable_version(repository, "m") == 1  # the rejected network's copy does not serve

"""A real `graft serve` on the accelerated runtime: what runs each version, and where it shows.

One server holds `colours` (exported with its ONNX file) and `plain` (exported without): the
first runs on ONNX Runtime, the second on TensorFlow with the reason, and both answer.
"""

import base64
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from support.exports import make_tiny_model
from support.trained import tinted_photo

from service.store.repository import ModelRepository

TOKEN = "runtime-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, colour_export: Path) -> Iterator:
    from support.server import running_server

    from training.export import export_model

    root = tmp_path_factory.mktemp("runtime-models")
    repository = ModelRepository(root)
    repository.publish(colour_export, "colours")
    plain = export_model(
        make_tiny_model(3),
        tmp_path_factory.mktemp("plain") / "export",
        labels=["r", "g", "b"],
        image_size=32,
        backbone="tiny-cnn",
        accelerated=False,
    )
    repository.publish(plain, "plain")
    env = {"GRAFT_ADMIN_TOKEN": TOKEN}
    with running_server(root, default_model="colours", env=env) as running:
        yield running


def _versions(server) -> dict[str, dict]:
    models = httpx.get(f"{server.http}/models", headers=AUTH, timeout=30).json()["models"]
    return {model["name"]: model["versions"][0] for model in models}


def test_each_version_says_what_runs_it(server) -> None:
    versions = _versions(server)
    assert versions["colours"]["runtime"] == "onnxruntime"
    assert versions["colours"]["runtime_note"] is None
    assert versions["colours"]["device"] == "cpu"
    assert versions["plain"]["runtime"] == "tensorflow"
    assert "has no accelerated file (onnx/model.onnx)" in versions["plain"]["runtime_note"]
    assert "graft export-onnx plain 1" in versions["plain"]["runtime_note"]


def test_the_metadata_routes_and_metrics_name_the_runtime(server) -> None:
    tf_meta = httpx.get(f"{server.http}/v1/models/colours/metadata", timeout=30).json()
    assert tf_meta["metadata"]["runtime"] == "onnxruntime"
    assert tf_meta["metadata"]["device"] == "cpu"
    assert "serving_default" in tf_meta["metadata"]["signature_def"]["signature_def"]
    v2 = httpx.get(f"{server.http}/v2/models/plain", timeout=30).json()
    assert v2["platform"] == "tensorflow_savedmodel"
    v2 = httpx.get(f"{server.http}/v2/models/colours", timeout=30).json()
    assert v2["platform"] == "onnxruntime_onnx"
    text = httpx.get(f"{server.http}/metrics", timeout=30).text
    for model, runtime in (("colours", "onnxruntime"), ("plain", "tensorflow")):
        labels = f'device="cpu",model="{model}",runtime="{runtime}",version="1"'
        assert f"graft_model_runtime{{{labels}}} 1.0" in text
    assert 'graft_runtime_fallbacks_total{model="plain",runtime="onnxruntime"} 1.0' in text


def test_the_accelerated_version_answers_with_the_savedmodels_numbers(
    server, colour_export: Path
) -> None:
    import tensorflow as tf

    images = [tinted_photo(colour) for colour in ("red", "green", "blue")]
    body = {"instances": [{"b64": base64.b64encode(image).decode()} for image in images]}
    reply = httpx.post(f"{server.http}/v1/models/colours:predict", json=body, timeout=60)
    assert reply.status_code == 200, reply.text
    served = np.array([p["probabilities"] for p in reply.json()["predictions"]])
    signature = tf.saved_model.load(str(colour_export)).signatures["serving_default"]
    expected = signature(images=tf.constant(images))["probabilities"].numpy()
    assert np.abs(served - expected).max() <= 1e-4
    assert [p["label"] for p in reply.json()["predictions"]] == ["red", "green", "blue"]

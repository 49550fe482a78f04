"""The out-of-distribution flag: the fit on known features, the export's outputs on TensorFlow
and ONNX Runtime, and a real server (HTTP, gRPC, TF Serving REST, V2, `reject_unknown`, the
metrics) serving a version with the flag beside one exported before it."""

import base64
import json
import re
import shutil
import time
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from support.exports import generated_images, make_tiny_export, make_tiny_model
from support.images import encode
from support.server import running_server

from training.ood import (
    MAHALANOBIS,
    conformal_quantile,
    fit_detector,
    record,
    scores,
    shrunk_covariance,
)

FLAGGED, OLD = "flagged", "old"  # a version with the OOD outputs, one exported before them
SIZE = 32


def _clusters(count: int, seed: int, width: int = 16, classes: int = 3) -> tuple:
    """Points around `classes` means (a shared, non-isotropic spread) and their classes."""
    rng = np.random.default_rng(seed)
    means = np.random.default_rng(99).normal(0, 6, (classes, width))
    spread = np.linspace(0.3, 2.0, width)  # some directions far wider than others
    labels = np.arange(count) % classes
    return means[labels] + rng.normal(0, 1, (count, width)) * spread, labels


def test_the_fit_flags_far_points_and_about_one_percent_of_points_like_the_training_ones() -> None:
    train, labels = _clusters(3000, seed=0)
    val, _ = _clusters(1000, seed=1)
    test, _ = _clusters(2000, seed=2)
    detector, val_scores = fit_detector(train, labels, val)
    assert detector.method == MAHALANOBIS and detector.percentile == 99.0
    assert np.mean(val_scores > detector.threshold) == pytest.approx(0.01, abs=0.002)
    assert 0.002 <= np.mean(scores(detector.layer, test) > detector.threshold) <= 0.03
    # Along the narrow directions a point is far long before it is far in plain distance.
    narrow = train[:1].copy()
    narrow[0, 0] += 6.0  # 20 of that direction's spreads, but 6 / |train| in Euclidean terms
    far = train[:1] + 100.0
    far_scores = scores(detector.layer, np.concatenate([narrow, far]))
    assert (far_scores > detector.threshold).all()
    assert scores(detector.layer, train[:200]).mean() < detector.threshold


def test_the_score_is_the_mahalanobis_distance_to_the_nearest_class_mean() -> None:
    train, labels = _clusters(600, seed=3, width=5)
    detector, _ = fit_detector(train, labels, train[:50])
    means = np.stack([train[labels == c].mean(axis=0) for c in range(3)])
    covariance, shrinkage = shrunk_covariance(train - means[labels])
    assert 0.0 <= shrinkage < 0.5  # plenty of points for 5 dimensions: little shrinkage
    inverse = np.linalg.inv(covariance)
    points = train[:7] + np.random.default_rng(4).normal(0, 3, (7, 5))
    expected = [min((p - m) @ inverse @ (p - m) for m in means) / 5 for p in points]
    np.testing.assert_allclose(scores(detector.layer, points), expected, rtol=1e-4)


def test_augmented_views_join_the_threshold_but_not_the_validation_scores() -> None:
    train, labels = _clusters(3000, seed=20)
    val, _ = _clusters(255, seed=21)
    views = [val + np.random.default_rng(22 + i).normal(0, 0.5, val.shape) for i in range(2)]
    alone, alone_scores = fit_detector(train, labels, val)
    detector, val_scores = fit_detector(train, labels, val, val_views=views)
    np.testing.assert_array_equal(val_scores, alone_scores)  # the images' own scores only
    assert (alone.calibration_count, detector.calibration_count) == (255, 3 * 255)
    every = np.concatenate([val_scores, *(scores(detector.layer, view) for view in views)])
    assert detector.threshold == conformal_quantile(every, 99.0)
    assert detector.threshold > alone.threshold  # the views lie a little further out
    assert record(detector, val_scores, val_scores)["calibration_count"] == 765


def test_the_threshold_is_the_conformal_percentile_of_the_validation_scores() -> None:
    # 255 scores: rank ceil(256 * 0.99) = 254, the second highest (np.percentile's linear
    # interpolation sits between the 3rd and 4th highest); 50 scores: past n, the highest.
    values = np.random.default_rng(8).permutation(np.arange(255, dtype=np.float64))
    assert conformal_quantile(values, 99.0) == 253.0
    assert np.percentile(values, 99.0) < 252.0
    assert conformal_quantile(values[:50], 99.0) == values[:50].max()
    assert conformal_quantile(values, 50.0) == 127.0  # rank 128 of 0..254


def test_a_new_point_like_the_validation_ones_is_flagged_at_most_one_time_in_a_hundred() -> None:
    # The guarantee holds on average over validation draws: many small ones, one fit.
    train, labels = _clusters(3000, seed=10, width=8)
    layer = fit_detector(train, labels, train[:10])[0].layer
    pool = scores(layer, _clusters(200_000, seed=11, width=8)[0])
    rng = np.random.default_rng(12)
    rates = []
    for _ in range(400):
        draw = rng.choice(len(pool), 255 + 100, replace=False)
        threshold = conformal_quantile(pool[draw[:255]], 99.0)
        rates.append(np.mean(pool[draw[255:]] > threshold))
    assert np.mean(rates) <= 0.01
    interpolated = [  # fresh draws thresholded at np.percentile flag more
        np.mean(pool[d[255:]] > np.percentile(pool[d[:255]], 99.0))
        for d in (rng.choice(len(pool), 355, replace=False) for _ in range(400))
    ]
    assert np.mean(interpolated) > np.mean(rates)


def _white() -> bytes:
    """An image unlike the tiny training set (noise with one strong channel)."""
    return encode(np.full((SIZE, SIZE, 3), 255, np.uint8), "PNG")


def _leaf_like(count: int = 3) -> list[bytes]:
    """Images drawn like the tiny training set (noise with one dominant channel)."""
    images, _ = generated_images(count, 3, SIZE, seed=7)
    return [encode(np.clip(image, 0, 255).astype(np.uint8), "PNG") for image in images]


@pytest.fixture(scope="module")
def model_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from service.store.repository import ModelRepository

    root = tmp_path_factory.mktemp("ood")
    repository = ModelRepository(root / "models")
    repository.publish(make_tiny_export(root / "flagged", ood=True), FLAGGED)
    repository.publish(make_tiny_export(root / "old"), OLD)
    return root / "models"


def test_the_export_has_the_outputs_in_both_signatures_and_onnx_runtime_agrees(
    model_root: Path,
) -> None:
    import tensorflow as tf

    from service.runtime.loaded_model import LoadedModel
    from service.runtime.networks import ONNXRUNTIME, Engine, default_threads, open_network
    from service.store.repository import ModelRepository

    folder = model_root / FLAGGED / "1"
    manifest = json.loads((folder / "graft.json").read_text())
    assert manifest["ood"]["method"] == MAHALANOBIS and manifest["ood"]["percentile"] == 99.0
    threshold = manifest["ood"]["threshold"]
    images = [*_leaf_like(), _white()]
    loaded = tf.saved_model.load(str(folder))
    served = loaded.signatures["serving_default"](images=tf.constant(images))
    score, flag = served["ood_score"].numpy(), served["in_distribution"].numpy()
    assert score.dtype == np.float32 and flag.dtype == bool and score.shape == (4,)
    assert (flag == (score <= threshold)).all()
    assert flag.tolist() == [True, True, True, False]
    pixels = np.stack([tf.io.decode_png(image).numpy() for image in images])
    by_pixels = loaded.signatures["serve_pixels"](pixels=tf.constant(pixels))
    np.testing.assert_allclose(by_pixels["ood_score"].numpy(), score, rtol=1e-5)
    assert (by_pixels["in_distribution"].numpy() == flag).all()

    network = open_network(ONNXRUNTIME, folder / "onnx/model.onnx", default_threads(1))
    assert set(network.output_names) == {"probabilities", "ood_score", "in_distribution"}
    decoded = loaded.signatures["preprocess"](images=tf.constant(images))["pixels"].numpy()
    fast = network.outputs(decoded)
    np.testing.assert_allclose(fast["ood_score"], score, rtol=1e-4)
    assert (fast["in_distribution"] == flag).all()
    np.testing.assert_allclose(network.run(decoded), served["probabilities"].numpy(), atol=1e-5)

    repository = ModelRepository(model_root)
    accelerated = LoadedModel.load(repository, FLAGGED, 1, Engine(ONNXRUNTIME, 1))
    assert accelerated.runtime == ONNXRUNTIME and accelerated.has_ood  # agreed at load
    on_tf = LoadedModel.load(repository, FLAGGED, 1).infer(images)
    on_ort = accelerated.infer(images)
    np.testing.assert_allclose(on_ort.ood_score, on_tf.ood_score, rtol=1e-4)
    assert (on_ort.in_distribution == on_tf.in_distribution).all()
    assert not LoadedModel.load(repository, OLD, 1).has_ood


def test_an_onnx_file_without_the_ood_outputs_is_not_served_beside_a_savedmodel_with_them(
    model_root: Path, tmp_path: Path
) -> None:
    from service.runtime.loaded_model import LoadedModel
    from service.runtime.networks import ONNXRUNTIME, Engine
    from service.store.manifest import Manifest, hash_tree, sha256_file
    from service.store.repository import ModelRepository
    from training.onnx_export import write_onnx

    folder = tmp_path / "export"
    shutil.copytree(model_root / FLAGGED / "1", folder)
    # The probabilities-only network of another model, as a hand-edited version would hold.
    write_onnx(make_tiny_model(3), SIZE, "probabilities", folder / "onnx/model.onnx")
    manifest = Manifest.read(folder)
    accelerated = manifest.accelerated.model_copy(
        update={"sha256": sha256_file(folder / "onnx/model.onnx")}
    )
    update = {"name": None, "version": None, "files": hash_tree(folder), "accelerated": accelerated}
    manifest.model_copy(update=update).write(folder)
    repository = ModelRepository(tmp_path / "models")
    repository.publish(folder, "mixed")
    model = LoadedModel.load(repository, "mixed", 1, Engine(ONNXRUNTIME, 1))
    assert model.runtime == "tensorflow"
    assert "lacks the out-of-distribution outputs" in (model.runtime_note or "")


@pytest.fixture(scope="module")
def server(model_root: Path):
    with running_server(model_root, default_model=FLAGGED, grpc=True) as running:
        yield running


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.http, timeout=60) as client:
        yield client


def _classify(http: httpx.Client, images: list[bytes], **fields: str) -> httpx.Response:
    files = [("images", (f"image{i}.png", data, "image/png")) for i, data in enumerate(images)]
    return http.post("/classify", files=files, data=fields)


def _unknown_count(http: httpx.Client, model: str) -> float:
    total = 0.0
    for line in http.get("/metrics").text.splitlines():
        match = re.match(r"graft_predictions_total{(.*)} (\S+)$", line)
        if match and 'label="unknown"' in match.group(1) and f'model="{model}"' in match.group(1):
            total += float(match.group(2))
    return total


@pytest.mark.slow
def test_http_returns_the_flag_and_reject_unknown_answers_unknown(http: httpx.Client) -> None:
    images = [*_leaf_like(2), _white()]
    plain = _classify(http, images)
    assert plain.status_code == 200, plain.text
    results = plain.json()["results"]
    assert [r["in_distribution"] for r in results] == [True, True, False]
    assert all(isinstance(r["ood_score"], float) for r in results)
    assert results[2]["label"] != "unknown"  # flagged, but nobody asked to reject it
    before = _unknown_count(http, FLAGGED)
    rejecting = _classify(http, images, reject_unknown="true")
    assert rejecting.status_code == 200, rejecting.text
    labels = [r["label"] for r in rejecting.json()["results"]]
    assert labels[:2] == [r["label"] for r in results[:2]] and labels[2] == "unknown"
    assert _unknown_count(http, FLAGGED) == before + 1
    as_json = http.post(
        "/classify",
        json={"images": [{"b64": base64.b64encode(_white()).decode()}], "reject_unknown": True},
    )
    assert as_json.json()["results"][0]["label"] == "unknown"
    gauge = re.search(
        rf'graft_ood_rate{{[^}}]*model="{FLAGGED}"[^}}]*}} (\S+)', http.get("/metrics").text
    )
    assert gauge and 0 < float(gauge.group(1)) < 1


@pytest.mark.slow
def test_tf_serving_rest_and_v2_return_the_extra_outputs(http: httpx.Client) -> None:
    image = {"b64": base64.b64encode(_white()).decode()}
    rows = http.post(f"/v1/models/{FLAGGED}:predict", json={"instances": [image]})
    assert rows.status_code == 200, rows.text
    [row] = rows.json()["predictions"]
    assert row["in_distribution"] is False and row["ood_score"] > 0
    body = {
        "inputs": [{"name": "images", "datatype": "BYTES", "shape": [1], "data": [image["b64"]]}]
    }
    v2 = http.post(f"/v2/models/{FLAGGED}/infer", json=body)
    assert v2.status_code == 200, v2.text
    outputs = {o["name"]: o for o in v2.json()["outputs"]}
    assert outputs["in_distribution"]["datatype"] == "BOOL"
    assert outputs["in_distribution"]["data"] == [False]
    assert outputs["ood_score"]["data"][0] == pytest.approx(row["ood_score"], rel=1e-5)
    old = http.post(f"/v2/models/{OLD}/infer", json=body)
    assert {o["name"] for o in old.json()["outputs"]} == {"probabilities", "label", "score"}


@pytest.mark.slow
def test_grpc_returns_the_flag_and_honours_reject_unknown(server) -> None:
    from service.stubs.graft.v1 import classifier_pb2 as pb
    from service.stubs.graft.v1 import classifier_pb2_grpc as pb_grpc

    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = pb_grpc.ImageClassifierStub(channel)
        images = [*_leaf_like(1), _white()]
        plain = stub.Classify(pb.ClassifyRequest(model=FLAGGED, images=images), timeout=60)
        assert [r.in_distribution for r in plain.results] == [True, False]
        assert all(r.HasField("ood_score") for r in plain.results)
        rejecting = pb.ClassifyRequest(model=FLAGGED, images=images, reject_unknown=True)
        answer = stub.Classify(rejecting, timeout=60)
        assert answer.results[1].label == "unknown" and answer.results[0].label != "unknown"
        old = stub.Classify(pb.ClassifyRequest(model=OLD, images=images), timeout=60)
        assert not any(
            r.HasField("in_distribution") or r.HasField("ood_score") for r in old.results
        )
        predicted = _tf_serving_predict(channel, images)
        assert predicted["in_distribution"].bool_val == [True, False]
        scores = np.frombuffer(predicted["ood_score"].tensor_content, "<f4")
        assert scores.shape == (2,) and scores[1] > scores[0]
        with pytest.raises(grpc.RpcError) as refused:
            stub.Classify(
                pb.ClassifyRequest(model=OLD, images=images, reject_unknown=True), timeout=60
            )
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "reject_unknown" in refused.value.details()


def _tf_serving_predict(channel: grpc.Channel, images: list[bytes]) -> dict:
    """tensorflow.serving.PredictionService/Predict with graft's copy of TF Serving's protos."""
    from service.stubs.tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
    from service.stubs.tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    shape = tensor_shape_pb2.TensorShapeProto(
        dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=len(images))]
    )
    tensor = tensor_pb2.TensorProto(
        dtype=types_pb2.DT_STRING, tensor_shape=shape, string_val=images
    )
    request = predict_pb2.PredictRequest(inputs={"images": tensor})
    request.model_spec.name = FLAGGED
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    return dict(stub.Predict(request, timeout=60).outputs)


@pytest.mark.slow
def test_an_old_version_answers_null_fields_and_a_clear_400_for_reject_unknown(
    http: httpx.Client,
) -> None:
    plain = _classify(http, [_white()], model=OLD)
    assert plain.status_code == 200, plain.text
    [result] = plain.json()["results"]
    assert result["in_distribution"] is None and result["ood_score"] is None
    refused = _classify(http, [_white()], model=OLD, reject_unknown="true")
    assert refused.status_code == 400
    message = refused.json()["message"]
    assert "reject_unknown" in message and "no out-of-distribution flag" in message
    assert "graft train" in message
    bad = _classify(http, [_white()], reject_unknown="perhaps")
    assert bad.status_code == 400 and "reject_unknown" in bad.json()["message"]
    assert http.get("/livez").status_code == 200 and http.get("/readyz").status_code == 200


@pytest.mark.slow
def test_the_models_policy_can_make_reject_unknown_the_default(
    http: httpx.Client, model_root: Path
) -> None:
    policy = model_root / FLAGGED / "policy.json"
    policy.write_text(json.dumps({"pin": None, "reject_unknown": True}))
    try:
        for _ in range(100):  # the poll picks policy.json up within GRAFT_POLL_INTERVAL_S
            answer = _classify(http, [_white(), *_leaf_like(1)])
            if answer.json()["results"][0]["label"] == "unknown":
                break
            time.sleep(0.2)
        labels = [r["label"] for r in answer.json()["results"]]
        assert labels[0] == "unknown" and labels[1] != "unknown"
        asked_not = _classify(http, [_white()], reject_unknown="false")
        assert asked_not.json()["results"][0]["label"] != "unknown"  # the request decides
    finally:
        policy.write_text(json.dumps({"pin": None}))

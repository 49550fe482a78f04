"""The Open Inference Protocol (KServe V2) spoken by clients nobody here wrote: NVIDIA's
tritonclient, HTTP (JSON and binary tensor data) and gRPC, against a real `graft serve` on
loopback. Their answers must be graft's own /classify answers for the same images.

tritonclient cannot share graft's venv (it pins protobuf < 7), so it runs from its own,
tests/.venv-tritonclient, which `make setup` builds; support/triton_calls.py makes the calls.
"""

import base64
import concurrent.futures
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.server import RunningServer, paused_inference, wait_for_images_in_flight
from support.trained import COLOURS
from support.v2_clients import (
    MODEL,
    assert_matches_classify,
    classify,
    client_python,
    encode,
    output_data,
    run_client_calls,
    tinted,
)

from service.stubs.kserve import grpc_predict_v2_pb2 as pb
from service.stubs.kserve import grpc_predict_v2_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow

# red as JPEG, green as PNG, blue as BMP; green and blue are lossless, so their pixels are
# exactly what the `pixels` input is sent.
PHOTOS = {
    "red.jpg": encode(tinted("red"), "JPEG"),
    "green.png": encode(tinted("green"), "PNG"),
    "blue.bmp": encode(tinted("blue"), "BMP"),
}
PIXELS = np.stack([tinted("green"), tinted("blue")])
PIXEL_PHOTOS = ("green.png", "blue.bmp")


@pytest.fixture(scope="module")
def triton_python() -> Path:
    """Checked before the server starts: a missing venv fails at once."""
    return client_python(".venv-tritonclient", "setup_tritonclient.sh", "tritonclient")


@pytest.fixture(scope="module")
def calls(
    triton_python: Path, v2_server: RunningServer, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("v2-images")
    return run_client_calls(triton_python, "triton_calls.py", v2_server, PHOTOS, PIXELS, folder)


@pytest.fixture(scope="module")
def classified(v2_server: RunningServer) -> dict[str, dict[str, Any]]:
    """graft's own answer for each photo: /classify, every class in top_k."""
    return classify(v2_server, PHOTOS)


def test_health_and_metadata_through_both_clients(calls: dict[str, Any]) -> None:
    for side in ("http", "grpc"):
        found = calls[side]
        assert found["live"] is True and found["ready"] is True, side
        assert found["model_ready"] == [True, True], side
        assert found["server_metadata"]["name"] == "graft"
        assert "binary_tensor_data" in found["server_metadata"]["extensions"]
        metadata = found["model_metadata"]
        assert metadata["name"] == MODEL and metadata["versions"] == ["1"]
        assert metadata["platform"] == "onnxruntime_onnx"
        inputs = {tensor["name"]: tensor["datatype"] for tensor in metadata["inputs"]}
        assert inputs == {"images": "BYTES", "pixels": "UINT8"}
        outputs = {tensor["name"]: tensor for tensor in metadata["outputs"]}
        assert [int(dim) for dim in outputs["probabilities"]["shape"]] == [-1, len(COLOURS)]
        assert outputs["label"]["datatype"] == "BYTES"


def test_http_json_answers_equal_classify(calls: dict[str, Any], classified: dict) -> None:
    found = calls["http"]
    assert_matches_classify(found["json"], list(classified.values()))
    assert [output["name"] for output in found["json_response"]["outputs"]] == [
        "probabilities", "label", "score",
    ]  # fmt: skip
    assert all("data" in output for output in found["json_response"]["outputs"])
    assert found["json_response"]["id"] == "json-1"
    assert output_data(found["json"], "label") == list(COLOURS)  # the model really sees the colour


def test_http_binary_answers_equal_classify(calls: dict[str, Any], classified: dict) -> None:
    found = calls["http"]
    assert_matches_classify(found["binary"], list(classified.values()))
    response = found["binary_response"]
    assert response["id"] == "bin-1" and response["model_version"] == "1"
    names = [output["name"] for output in response["outputs"]]
    assert names == ["probabilities", "label", "score", "top_k_label", "top_k_score"]
    assert all("binary_data_size" in output["parameters"] for output in response["outputs"])
    # parameters.top_k = 2: the two most probable classes of each image, best first.
    for labels, scores, result in zip(
        output_data(found["binary"], "top_k_label"),
        output_data(found["binary"], "top_k_score"),
        classified.values(),
        strict=True,
    ):
        assert labels == [top["label"] for top in result["top_k"][:2]]
        np.testing.assert_allclose(scores, [t["score"] for t in result["top_k"][:2]], atol=1e-6)


def test_http_outputs_choose_json_or_binary_each(calls: dict[str, Any], classified: dict) -> None:
    found = calls["http"]
    outputs = {output["name"]: output for output in found["mixed_response"]["outputs"]}
    assert list(outputs) == ["label", "probabilities", "top_k_score"]
    assert outputs["label"]["data"] == [result["label"] for result in classified.values()]
    assert outputs["probabilities"]["parameters"]["binary_data_size"] == 3 * len(COLOURS) * 4
    assert outputs["top_k_score"]["shape"] == [3, min(5, len(COLOURS))]  # k: 5, at most C
    np.testing.assert_allclose(
        output_data(found["mixed"], "probabilities"),
        output_data(found["json"], "probabilities"),
        atol=1e-6,
    )


def test_pixels_answer_as_their_lossless_photos(calls: dict[str, Any], classified: dict) -> None:
    expected = [classified[name] for name in PIXEL_PHOTOS]
    assert_matches_classify(calls["http"]["pixels"], expected)
    assert_matches_classify(calls["grpc"]["pixels"], expected)


def test_grpc_answers_equal_classify(calls: dict[str, Any], classified: dict) -> None:
    found = calls["grpc"]
    assert_matches_classify(found["images"], list(classified.values()))
    assert found["id"] == "grpc-1"
    top = output_data(found["images"], "top_k_label")
    assert top == [[t["label"] for t in result["top_k"]] for result in classified.values()]
    assert found["subset_order"] == ["score", "top_k_label", "label"]
    assert set(found["subset"]) == {"score", "top_k_label", "label"}


def test_errors_reach_the_clients_as_protocol_errors(calls: dict[str, Any]) -> None:
    http, grpc_found = calls["http"], calls["grpc"]
    assert http["unknown_model"]["status"] == "404"
    assert "no-such-model" in http["unknown_model"]["message"]
    assert http["unknown_version"]["status"] == "404"
    assert "no version 99" in http["unknown_version"]["message"]
    assert grpc_found["unknown_model"]["status"] == "StatusCode.NOT_FOUND"
    assert grpc_found["bad_datatype"]["status"] == "StatusCode.INVALID_ARGUMENT"
    assert "must be BYTES" in grpc_found["bad_datatype"]["message"]


def _mixes(server: RunningServer) -> dict[str, float]:
    text = httpx.get(f"{server.http}/metrics", timeout=30).text
    return {
        sample.labels["protocols"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "graft_inference_batches_total"
    }


def _v2_rest(server: RunningServer) -> None:
    body = {"inputs": [_b64_images(PHOTOS["red.jpg"])]}
    response = httpx.post(f"{server.http}/v2/models/{MODEL}/infer", json=body, timeout=60)
    assert response.status_code == 200, response.text


def _b64_images(photo: bytes) -> dict[str, Any]:
    return {
        "name": "images", "datatype": "BYTES", "shape": [1],
        "data": [base64.b64encode(photo).decode()],
    }  # fmt: skip


def _v2_grpc(server: RunningServer) -> None:
    with grpc.insecure_channel(str(server.grpc_target)) as channel:
        tensor = pb.ModelInferRequest.InferInputTensor(name="images", datatype="BYTES", shape=[1])
        tensor.contents.bytes_contents.append(PHOTOS["red.jpg"])
        request = pb.ModelInferRequest(model_name=MODEL, inputs=[tensor])
        pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=60)


def _classify(server: RunningServer) -> None:
    files = [("images", ("red.jpg", PHOTOS["red.jpg"], "image/jpeg"))]
    assert httpx.post(f"{server.http}/classify", files=files, timeout=60).status_code == 200


def test_v2_requests_share_batches_with_classify(v2_server: RunningServer) -> None:
    mix = "http+v2+v2-grpc"
    before = _mixes(v2_server).get(mix, 0.0)
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        with paused_inference(v2_server):
            futures = [pool.submit(call, v2_server) for call in (_classify, _v2_rest, _v2_grpc)]
            wait_for_images_in_flight(v2_server, 3)
        for future in futures:
            future.result(timeout=60)
    assert _mixes(v2_server).get(mix, 0.0) == before + 1, _mixes(v2_server)


def test_metrics_label_v2_with_route_templates(v2_server: RunningServer, calls: dict) -> None:
    httpx.post(f"{v2_server.http}/v2/models/not-a-model/infer", json={}, timeout=30)
    _v2_grpc(v2_server)
    text = httpx.get(f"{v2_server.http}/metrics", timeout=30).text
    series = [
        sample.labels
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "graft_request_duration_seconds_count"
        and sample.labels["protocol"] in ("v2", "v2-grpc")
    ]
    routes = {labels["route"] for labels in series}
    assert "/v2/models/{name}/infer" in routes
    assert "/inference.GRPCInferenceService/ModelInfer" in routes
    assert routes <= {
        "/v2/models/{name}", "/v2/models/{name}/ready", "/v2/models/{name}/infer",
        "/inference.GRPCInferenceService/ModelInfer",
        "/inference.GRPCInferenceService/ModelMetadata",
        "/inference.GRPCInferenceService/ModelReady",
    }, routes  # fmt: skip
    assert {labels["model"] for labels in series} <= {MODEL, ""}
    graft_series = "\n".join(line for line in text.splitlines() if line.startswith("graft_"))
    assert "not-a-model" not in graft_series and "no-such-model" not in graft_series
    codes = {labels["code"] for labels in series if labels["protocol"] == "v2-grpc"}
    assert codes <= {"OK", "NOT_FOUND", "INVALID_ARGUMENT"}, codes
    assert {labels["code"] for labels in series if labels["protocol"] == "v2"} <= {"200", "404"}

"""gRPC against a real `graft serve` (BentoML entry + inference services) on loopback.

One server for the module: gRPC answers must equal HTTP's for the same image and version,
and concurrent HTTP and gRPC requests must land in the same inference batches.
"""

import base64
import io
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tensorflow as tf
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from skimage import data as photos
from support.server import (
    RunningServer,
    paused_inference,
    running_server,
    wait_for_images_in_flight,
)
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from service import errors
from service.client.grpc import GrpcClient
from service.client.http import GraftClient

MODEL = "colours"
PER_PROTOCOL = 12  # concurrent single-image requests per protocol in the shared-batch test


@pytest.fixture(scope="module")
def server(colour_model_root: Path) -> Iterator[RunningServer]:
    # The shared-batch test pauses the inference worker (two-process layout only).
    with running_server(
        colour_model_root, default_model=MODEL, grpc=True, separate_inference=True
    ) as running:
        yield running


@pytest.fixture(scope="module")
def channel(server: RunningServer) -> Iterator[grpc.Channel]:
    assert server.grpc_target is not None
    with grpc.insecure_channel(server.grpc_target) as open_channel:
        yield open_channel


@pytest.fixture(scope="module")
def client(server: RunningServer) -> Iterator[GrpcClient]:
    assert server.grpc_target is not None
    with GraftClient.grpc(server.grpc_target) as open_client:
        yield open_client


@pytest.fixture(scope="module")
def photo() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(photos.chelsea()).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _http_classify(server: RunningServer, image: bytes, **fields: object) -> dict:
    body = {"images": [{"b64": base64.b64encode(image).decode()}], **fields}
    response = httpx.post(f"{server.http}/classify", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def test_health_is_serving_once_the_server_is_warm(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service, expected in (("", "SERVING"), (MODEL, "SERVING"), ("absent", "NOT_SERVING")):
        response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert health_pb2.HealthCheckResponse.ServingStatus.Name(response.status) == expected


def test_classify_and_stream_agree_with_http(
    server: RunningServer, client: GrpcClient, photo: bytes
) -> None:
    over_http = _http_classify(server, photo, top_k=3)
    over_grpc = client.classify([photo], top_k=3)
    assert (over_grpc.model, over_grpc.version) == (over_http["model"], over_http["version"])
    expected = over_http["results"][0]
    (result,) = over_grpc.results
    assert [c.label for c in result.top_k] == [c["label"] for c in expected["top_k"]]
    assert [c.score for c in result.top_k] == pytest.approx(
        [c["score"] for c in expected["top_k"]], abs=1e-5
    )
    batches = [[photo], [b"GIF89a broken"], [photo, photo]]
    streamed = list(client.classify_stream(batches, top_k=3))
    assert isinstance(streamed[1], errors.InvalidImage)
    for answer, count in ((streamed[0], 1), (streamed[2], 2)):
        assert not isinstance(answer, errors.GraftError)
        assert [r.label for r in answer.results] == [result.label] * count
        # Batch composition moves float32 results in the last digits only.
        assert [r.score for r in answer.results] == pytest.approx([result.score] * count)


def test_stock_tf_serving_stub_predict_matches_http(
    server: RunningServer, channel: grpc.Channel, photo: bytes
) -> None:
    over_http = _http_classify(server, photo, top_k=3)
    request = predict_pb2.PredictRequest()
    request.model_spec.name = MODEL
    request.model_spec.version.value = over_http["version"]
    request.inputs["images"].CopyFrom(tf.make_tensor_proto([photo]))
    response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request)
    probabilities = tf.make_ndarray(response.outputs["probabilities"])[0]
    ranked = over_http["results"][0]["top_k"]
    assert len(ranked) == len(probabilities)  # top_k=3 covers every class: a full ranking
    np.testing.assert_allclose(
        np.sort(probabilities)[::-1], [c["score"] for c in ranked], atol=1e-5
    )
    assert tf.make_ndarray(response.outputs["label"])[0].decode() == ranked[0]["label"]
    assert response.model_spec.version.value == over_http["version"]

    rest = httpx.post(
        f"{server.http}/v1/models/{MODEL}:predict",
        json={"instances": [{"b64": base64.b64encode(photo).decode()}]},
        timeout=60,
    )
    assert rest.status_code == 200, rest.text
    rest_probabilities = rest.json()["predictions"][0]["probabilities"]
    np.testing.assert_allclose(probabilities, rest_probabilities, atol=1e-5)


def test_metadata_lists_the_signatures(channel: grpc.Channel) -> None:
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = MODEL
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    signatures = get_model_metadata_pb2.SignatureDefMap()
    stub.GetModelMetadata(request, timeout=30).metadata["signature_def"].Unpack(signatures)
    assert {"serving_default", "serve_pixels"} <= set(signatures.signature_def)
    assert "images" in signatures.signature_def["serving_default"].inputs


def test_failures_over_the_real_server(client: GrpcClient, photo: bytes) -> None:
    with pytest.raises(errors.InvalidImage):
        client.classify([b"\xff\xd8\xff" + b"\x00" * 64])
    with pytest.raises(errors.ModelNotFound):
        client.classify([photo], model="absent")
    with pytest.raises(errors.ModelNotFound):
        client.classify([photo], version=404)


def _mixed_batches(server: RunningServer) -> float:
    """Inference batches that held images of both HTTP and gRPC requests so far."""
    text = httpx.get(f"{server.http}/metrics", timeout=30).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "graft_inference_batches_total"
        and sample.labels["protocols"] == "grpc+http"
    )


def _http_call(server: RunningServer, photo: bytes) -> None:
    body = {"images": [{"b64": base64.b64encode(photo).decode()}]}
    response = httpx.post(f"{server.http}/classify", json=body, timeout=60)
    assert response.status_code == 200, response.text


def test_http_and_grpc_requests_share_inference_batches(
    server: RunningServer, client: GrpcClient, photo: bytes
) -> None:
    calls: list[Callable[[], object]] = [lambda: _http_call(server, photo)] * PER_PROTOCOL
    calls += [lambda: client.classify([photo])] * PER_PROTOCOL
    before = _mixed_batches(server)
    # The model worker is paused until every request of the burst is admitted, so it finds
    # both protocols' images waiting together, as under sustained load, on any machine speed.
    with ThreadPoolExecutor(len(calls)) as pool:
        with paused_inference(server):
            answers = [pool.submit(call) for call in calls]
            wait_for_images_in_flight(server, len(calls))
        for answer in answers:
            answer.result(timeout=120)  # re-raises a failed call
    assert _mixed_batches(server) > before, server.log_tail()


def test_grpc_requests_are_counted_with_protocol_grpc(
    server: RunningServer, client: GrpcClient, photo: bytes
) -> None:
    client.classify([photo])
    text = httpx.get(f"{server.http}/metrics", timeout=30).text
    counts = [
        sample
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "graft_request_duration_seconds_count"
        and sample.labels["protocol"] == "grpc"
        and sample.labels["code"] == "OK"
    ]
    assert sum(sample.value for sample in counts) >= 1

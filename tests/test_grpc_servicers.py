"""The gRPC servicers over a real channel, on a real Gateway, VersionManager and SavedModel.

The Gateway reaches the models in-process here (the same `run_batch` the BentoML inference
service runs), so every status code and stream behaviour is checked in seconds; the BentoML
round trip, shared batches and HTTP parity are in tests/test_grpc_server.py.
"""

import asyncio
import io
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from PIL import Image
from prometheus_client import REGISTRY
from skimage import data as photos
from support.exports import publish_tiny_model
from support.inference import InProcessInference, LoopThread
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from service import errors
from service.client.grpc import GrpcClient
from service.gateway.gateway import Gateway
from service.protocol.grpc.classifier import CLASSIFY_ROUTE
from service.protocol.grpc.server import start_grpc_server, stop_grpc_server
from service.runtime.loaded_model import LoadedModel
from service.runtime.versions import VersionManager
from service.settings import GraftSettings
from service.store.repository import ModelRepository
from service.stubs.graft.v1 import classifier_pb2 as pb
from service.stubs.graft.v1 import classifier_pb2_grpc as pb_grpc
from service.units import MiB

MODEL = "tiny"
T = TypeVar("T")
LATE_MODEL = "waiting"  # its load is held back until a test releases it
MAX_QUEUE = 16  # above what the stream test has in flight at once (14 images)
MAX_MESSAGE = 1 * MiB


@dataclass
class Stack:
    address: str
    root: Path
    release_late_model: threading.Event
    gateway: Gateway
    inference: InProcessInference
    loop: LoopThread


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("grpc") / "models"
    root.mkdir()
    publish_tiny_model(root, MODEL)
    release = threading.Event()

    def gated_load(repository: ModelRepository, name: str, version: int) -> LoadedModel:
        if name == LATE_MODEL:
            release.wait(120)
        return LoadedModel.load(repository, name, version)

    manager = VersionManager(ModelRepository(root), poll_interval_s=0.2, loader=gated_load)
    manager.start()
    settings = GraftSettings(
        model_root=root,
        default_model=MODEL,
        grpc_port=_free_port(),
        grpc_max_message_bytes=MAX_MESSAGE,
        max_queue=MAX_QUEUE,
        max_images_per_request=MAX_QUEUE,
    )
    inference = InProcessInference(manager)
    gateway = Gateway(inference, settings)
    loop = LoopThread()
    server = loop.run(_serve(gateway, settings))
    stack = Stack(f"127.0.0.1:{settings.grpc_port}", root, release, gateway, inference, loop)
    with GrpcClient(stack.address) as client:
        _wait_until(lambda: client.ready(MODEL), "the tiny model to load")
        # Published only now: start() waits for the first loads, so a gated model published
        # before it would hold the whole fixture back.
        publish_tiny_model(root, LATE_MODEL, labels=("cat", "dog"))
        _wait_until(lambda: _is_loading(client), "the late model to be seen")
    yield stack
    release.set()
    loop.run(stop_grpc_server(server, grace_s=1))
    manager.stop()
    loop.close()


def _small_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buffer, format="PNG")
    return buffer.getvalue()


_SMALL_PNG = _small_png()


def _is_loading(client: GrpcClient) -> bool:
    try:
        client.classify([_SMALL_PNG], model=LATE_MODEL)
    except errors.NotReady:
        return True
    except errors.GraftError:
        return False
    return False


async def _serve(gateway: Gateway, settings: GraftSettings) -> grpc.aio.Server:
    # As the entry service does: keep model states fresh, then serve.
    asyncio.get_running_loop().create_task(gateway.watch_status(0.1))
    return await start_grpc_server(gateway, settings)


def _wait_until(condition: Any, what: str, timeout_s: float = 120) -> None:
    deadline = threading.Event()
    timer = threading.Timer(timeout_s, deadline.set)
    timer.start()
    try:
        while not condition():
            if deadline.wait(0.1):
                raise TimeoutError(f"gave up waiting for {what} after {timeout_s} s")
    finally:
        timer.cancel()


@pytest.fixture(scope="module")
def channel(stack: Stack) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(stack.address) as open_channel:
        yield open_channel


@pytest.fixture(scope="module")
def client(stack: Stack) -> Iterator[GrpcClient]:
    with GrpcClient(stack.address) as open_client:
        yield open_client


def _jpeg(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def cat_photo() -> bytes:
    return _jpeg(photos.chelsea())


@pytest.fixture(scope="module")
def coffee_photo() -> bytes:
    return _jpeg(photos.coffee())


def _saved_model_probabilities(root: Path, images: list[bytes]) -> np.ndarray:
    """What the SavedModel itself says, without graft in between."""
    serve = tf.saved_model.load(str(root / MODEL / "1")).signatures["serving_default"]
    return serve(images=tf.constant(images))["probabilities"].numpy()


# First test of the module: the late model's load is gated for at most 120 s from the fixture's
# start, so this must run before slower tests use that time up.
def test_a_model_is_unavailable_and_not_serving_until_it_is_warm(
    stack: Stack, channel: grpc.Channel, client: GrpcClient, cat_photo: bytes
) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    check = health_pb2.HealthCheckRequest(service=LATE_MODEL)
    watch = health.Watch(check, timeout=120)
    assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert health.Check(check, timeout=10).status == health_pb2.HealthCheckResponse.NOT_SERVING
    with pytest.raises(errors.NotReady, match="loading"):
        client.classify([cat_photo], model=LATE_MODEL)
    stack.release_late_model.set()
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    watch.cancel()
    assert client.classify([cat_photo], model=LATE_MODEL).results[0].label in {"cat", "dog"}


def test_classify_a_photo_gives_the_saved_models_probabilities(
    stack: Stack, client: GrpcClient, cat_photo: bytes, coffee_photo: bytes
) -> None:
    response = client.classify([cat_photo, coffee_photo], top_k=3)
    expected = _saved_model_probabilities(stack.root, [cat_photo, coffee_photo])
    labels = ["red", "green", "blue"]
    assert (response.model, response.version) == (MODEL, 1)
    for result, row in zip(response.results, expected, strict=True):
        ranked = np.argsort(-row)
        assert [c.label for c in result.top_k] == [labels[i] for i in ranked]
        assert [c.score for c in result.top_k] == pytest.approx(row[ranked], abs=1e-5)
        assert (result.label, result.score) == (result.top_k[0].label, result.top_k[0].score)


def test_top_k_zero_means_the_default_and_negative_is_refused(
    channel: grpc.Channel, cat_photo: bytes
) -> None:
    stub = pb_grpc.ImageClassifierStub(channel)
    response = stub.Classify(pb.ClassifyRequest(images=[cat_photo]), timeout=60)
    assert len(response.results[0].top_classes) == 3  # default 5, capped at the 3 labels
    with pytest.raises(grpc.RpcError) as failure:
        stub.Classify(pb.ClassifyRequest(images=[cat_photo], top_k=-1), timeout=60)
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "top_k" in failure.value.details()


def test_stream_answers_in_order_and_reports_a_bad_request_in_band(
    client: GrpcClient, cat_photo: bytes, coffee_photo: bytes
) -> None:
    batches = [[cat_photo], [coffee_photo, cat_photo], [b"not an image"], [coffee_photo]] * 3
    answers = list(client.classify_stream(batches, top_k=1))
    assert len(answers) == len(batches)
    single = {
        photo: client.classify([photo], top_k=1).results[0] for photo in (cat_photo, coffee_photo)
    }
    for batch, answer in zip(batches, answers, strict=True):
        if batch == [b"not an image"]:
            assert isinstance(answer, errors.UnsupportedMediaType)
            assert "not an image format graft accepts" in answer.message
            continue
        assert not isinstance(answer, errors.GraftError)
        assert [r.label for r in answer.results] == [single[p].label for p in batch]
        assert [r.score for r in answer.results] == pytest.approx([single[p].score for p in batch])


def test_stream_echoes_request_ids(channel: grpc.Channel, cat_photo: bytes) -> None:
    stub = pb_grpc.ImageClassifierStub(channel)
    requests = [pb.ClassifyRequest(images=[cat_photo], request_id=f"r{i}") for i in range(5)]
    responses = list(stub.ClassifyStream(iter(requests), timeout=60))
    assert [r.request_id for r in responses] == [f"r{i}" for i in range(5)]


@pytest.mark.parametrize(
    ("request_fields", "status", "error", "message"),
    [
        ({"images": [b"\x89PNG\r\n\x1a\n broken"]}, "INVALID_ARGUMENT", errors.InvalidImage, "PNG"),
        ({"images": []}, "INVALID_ARGUMENT", errors.BadRequest, "at least one"),
        ({"model": "Bad Name!"}, "INVALID_ARGUMENT", errors.BadRequest, "Bad Name!"),
        ({"model": "nosuchmodel"}, "NOT_FOUND", errors.ModelNotFound, "nosuchmodel"),
        ({"version": 99}, "NOT_FOUND", errors.ModelNotFound, "no version 99"),
    ],
)
def test_failures_get_their_status_code_and_a_message(
    client: GrpcClient,
    channel: grpc.Channel,
    cat_photo: bytes,
    request_fields: dict[str, Any],
    status: str,
    error: type[errors.GraftError],
    message: str,
) -> None:
    fields = {"images": [cat_photo], **request_fields}
    with pytest.raises(grpc.RpcError) as failure:
        pb_grpc.ImageClassifierStub(channel).Classify(pb.ClassifyRequest(**fields), timeout=60)
    assert failure.value.code().name == status
    assert message in failure.value.details()
    with pytest.raises(error, match=message.replace("!", ".")):
        client.classify(fields["images"], model=fields.get("model"), version=fields.get("version"))


def test_a_message_over_the_limit_is_resource_exhausted(client: GrpcClient) -> None:
    with pytest.raises(errors.PayloadTooLarge, match="larger than max"):
        client.classify([b"\xff\xd8\xff" + bytes(MAX_MESSAGE)])


def test_more_images_than_the_queue_holds_is_invalid_argument(
    channel: grpc.Channel, cat_photo: bytes
) -> None:
    request = pb.ClassifyRequest(images=[cat_photo] * (MAX_QUEUE + 1))
    with pytest.raises(grpc.RpcError) as failure:
        pb_grpc.ImageClassifierStub(channel).Classify(request, timeout=60)
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # retrying cannot help
    assert "split" in (failure.value.details() or "")


def test_overload_is_resource_exhausted_with_a_retry_pushback(
    stack: Stack, channel: grpc.Channel, cat_photo: bytes
) -> None:
    stub = pb_grpc.ImageClassifierStub(channel)
    stack.inference.running.clear()
    holder = threading.Thread(  # fills the queue, then waits until the test lets it run
        target=stub.Classify, args=(pb.ClassifyRequest(images=[cat_photo] * MAX_QUEUE), 120)
    )
    holder.start()
    try:
        _wait_until(
            lambda: REGISTRY.get_sample_value("graft_images_in_flight") == MAX_QUEUE,
            "the queue to fill",
        )
        with pytest.raises(grpc.RpcError) as failure:
            stub.Classify(pb.ClassifyRequest(images=[cat_photo]), timeout=60)
    finally:
        stack.inference.running.set()
        holder.join()
    assert failure.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    trailers = dict(failure.value.trailing_metadata())
    assert trailers["graft-error-code"] == "overloaded"
    assert int(trailers["grpc-retry-pushback-ms"]) > 0


def test_the_clients_deadline_is_honoured(client: GrpcClient, cat_photo: bytes) -> None:
    with pytest.raises(errors.DeadlineExceeded):
        client.classify([cat_photo] * 3, timeout_s=0.001)


def test_the_server_answers_deadline_exceeded_itself_when_work_runs_late(
    stack: Stack, channel: grpc.Channel
) -> None:
    # The inference is held (not slowed by big inputs): the answer can only come from graft's
    # own deadline, whatever the machine's speed.
    labels = {"protocol": "grpc", "route": CLASSIFY_ROUTE, "model": MODEL, "version": ""}
    labels["code"] = "DEADLINE_EXCEEDED"
    before = REGISTRY.get_sample_value("graft_request_duration_seconds_count", labels) or 0
    request = pb.ClassifyRequest(images=[_SMALL_PNG])
    stack.inference.running.clear()
    try:
        with pytest.raises(grpc.RpcError) as failure:
            pb_grpc.ImageClassifierStub(channel).Classify(request, timeout=0.3)
    finally:
        stack.inference.running.set()
    assert failure.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert dict(failure.value.trailing_metadata())["graft-error-code"] == "deadline_exceeded"
    assert "deadline" in failure.value.details()
    after = REGISTRY.get_sample_value("graft_request_duration_seconds_count", labels)
    assert after == before + 1


def test_health_of_the_server_services_and_unknown_names(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    serving = health_pb2.HealthCheckResponse.SERVING
    for service in ("", "graft.v1.ImageClassifier", "tensorflow.serving.PredictionService", MODEL):
        request = health_pb2.HealthCheckRequest(service=service)
        assert health.Check(request, timeout=10).status == serving, service
    unknown = health_pb2.HealthCheckRequest(service="nosuchmodel")
    assert health.Check(unknown, timeout=10).status == health_pb2.HealthCheckResponse.NOT_SERVING


def test_reflection_lists_and_describes_every_service(channel: grpc.Channel) -> None:
    database = ProtoReflectionDescriptorDatabase(channel)
    assert {
        "graft.v1.ImageClassifier",
        "tensorflow.serving.PredictionService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= set(database.get_services())
    # What grpcurl does: rebuild the schema from the server alone.
    pool = descriptor_pool.DescriptorPool(database)
    classifier = pool.FindServiceByName("graft.v1.ImageClassifier")
    assert classifier.FindMethodByName("Classify").input_type.fields_by_name["images"]
    tf_serving = pool.FindServiceByName("tensorflow.serving.PredictionService")
    assert {"Predict", "GetModelMetadata", "Classify"} <= {m.name for m in tf_serving.methods}


def _predict_request(**spec: Any) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = spec.pop("name", MODEL)
    for key, value in spec.items():
        if key == "version":
            request.model_spec.version.value = value
        else:
            setattr(request.model_spec, key, value)
    return request


def test_tf_serving_predict_with_the_stock_stub(
    stack: Stack, channel: grpc.Channel, cat_photo: bytes, coffee_photo: bytes
) -> None:
    request = _predict_request(version=1)
    request.inputs["images"].CopyFrom(tf.make_tensor_proto([cat_photo, coffee_photo]))
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    response = stub.Predict(request, timeout=60)
    outputs = {name: tf.make_ndarray(tensor) for name, tensor in response.outputs.items()}
    expected = _saved_model_probabilities(stack.root, [cat_photo, coffee_photo])
    np.testing.assert_allclose(outputs["probabilities"], expected, atol=1e-5)
    np.testing.assert_allclose(outputs["score"], expected.max(axis=1), atol=1e-5)
    labels = np.array([b"red", b"green", b"blue"])
    assert outputs["label"].tolist() == labels[expected.argmax(axis=1)].tolist()
    assert (response.model_spec.name, response.model_spec.version.value) == (MODEL, 1)
    assert response.model_spec.signature_name == "serving_default"


def test_tf_serving_predict_output_filter_and_pixels_signature(
    stack: Stack, channel: grpc.Channel
) -> None:
    pixels = np.asarray(Image.fromarray(photos.chelsea()).resize((32, 32)))
    request = _predict_request(signature_name="serve_pixels")
    request.inputs["pixels"].CopyFrom(tf.make_tensor_proto(pixels[None]))
    request.output_filter.append("probabilities")
    response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request)
    assert list(response.outputs) == ["probabilities"]
    serve = tf.saved_model.load(str(stack.root / MODEL / "1")).signatures["serve_pixels"]
    expected = serve(pixels=tf.constant(pixels[None]))["probabilities"].numpy()
    np.testing.assert_allclose(
        tf.make_ndarray(response.outputs["probabilities"]), expected, atol=1e-5
    )


@pytest.mark.parametrize(
    ("spec", "inputs", "output_filter", "message"),
    [
        ({}, {"images": tf.make_tensor_proto([1.0])}, [], "DT_STRING"),
        ({}, {"pixels": tf.make_tensor_proto([b"x"])}, [], "exactly one input, 'images'"),
        ({"signature_name": "nope"}, {"images": tf.make_tensor_proto([b"x"])}, [], "nope"),
        (
            {"version_label": "stable"},
            {"images": tf.make_tensor_proto([b"x"])},
            [],
            "version_label",
        ),
        ({}, {"images": tf.make_tensor_proto([b"x"])}, ["logits"], "logits"),
        (
            {"signature_name": "serve_pixels"},
            {"pixels": tf.make_tensor_proto([[1, 2]], tf.uint8)},
            [],
            "[n, h, w, 3]",
        ),
    ],
)
def test_tf_serving_predict_refuses_malformed_requests(
    channel: grpc.Channel,
    spec: dict[str, Any],
    inputs: dict[str, Any],
    output_filter: list[str],
    message: str,
) -> None:
    request = _predict_request(**spec)
    for name, tensor in inputs.items():
        request.inputs[name].CopyFrom(tensor)
    request.output_filter.extend(output_filter)
    with pytest.raises(grpc.RpcError) as failure:
        prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=60)
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in failure.value.details()


def test_tf_serving_unknown_model_is_not_found(channel: grpc.Channel, cat_photo: bytes) -> None:
    request = _predict_request(name="nosuchmodel")
    request.inputs["images"].CopyFrom(tf.make_tensor_proto([cat_photo]))
    with pytest.raises(grpc.RpcError) as failure:
        prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=60)
    assert failure.value.code() == grpc.StatusCode.NOT_FOUND


def test_tf_serving_metadata_lists_the_signatures(channel: grpc.Channel) -> None:
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = MODEL
    response = prediction_service_pb2_grpc.PredictionServiceStub(channel).GetModelMetadata(request)
    signatures = get_model_metadata_pb2.SignatureDefMap()
    assert response.metadata["signature_def"].Unpack(signatures)
    assert set(signatures.signature_def) == {
        "serving_default", "serve_pixels", "preprocess", "explain"
    }  # fmt: skip
    serving = signatures.signature_def["serving_default"]
    assert serving.inputs["images"].dtype == tf.string.as_datatype_enum
    assert set(serving.outputs) == {"probabilities", "label", "score"}
    assert [d.size for d in serving.outputs["probabilities"].tensor_shape.dim] == [-1, 3]
    assert response.model_spec.version.value == 1


def test_tf_serving_classify_reads_tf_examples(
    stack: Stack, channel: grpc.Channel, cat_photo: bytes
) -> None:
    request = classification_pb2.ClassificationRequest()
    request.model_spec.name = MODEL
    example = request.input.example_list.examples.add()
    example.features.feature["image/encoded"].bytes_list.value.append(cat_photo)
    response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Classify(request)
    (classifications,) = response.result.classifications
    expected = _saved_model_probabilities(stack.root, [cat_photo])[0]
    assert [c.label for c in classifications.classes] == ["red", "green", "blue"]
    assert [c.score for c in classifications.classes] == pytest.approx(expected, abs=1e-5)

    request.input.example_list.examples.add()  # no image/encoded feature
    with pytest.raises(grpc.RpcError) as failure:
        prediction_service_pb2_grpc.PredictionServiceStub(channel).Classify(request)
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "image/encoded" in failure.value.details()


def test_requests_are_counted_with_protocol_grpc(client: GrpcClient, cat_photo: bytes) -> None:
    labels = {
        "protocol": "grpc",
        "route": CLASSIFY_ROUTE,
        "model": MODEL,
        "version": "1",
        "code": "OK",
    }
    before = REGISTRY.get_sample_value("graft_request_duration_seconds_count", labels) or 0
    client.classify([cat_photo])
    assert REGISTRY.get_sample_value("graft_request_duration_seconds_count", labels) == before + 1


def test_a_busy_port_fails_at_start_with_advice(stack: Stack) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        settings = GraftSettings(host="127.0.0.1", grpc_port=taken.getsockname()[1])
        with pytest.raises(RuntimeError, match="GRAFT_GRPC_PORT"):
            stack.loop.run(start_grpc_server(stack.gateway, settings))

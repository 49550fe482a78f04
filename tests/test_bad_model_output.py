"""A model that passed its warm-up but answers some image with NaN: over HTTP and gRPC the
caller gets a JSON error with graft's code (never a bare 500, never NaN probabilities), the
other images keep their answers and the server stays ready. A real `graft serve` on loopback
serving a real SavedModel that turns NaN for large images."""

from collections.abc import Iterator

import grpc
import httpx
import pytest
from support.exports import nan_for_large_images, raw_saved_model
from support.images import encode, random_rgb
from support.server import RunningServer, running_server

from service.store.repository import ModelRepository
from service.stubs.graft.v1 import classifier_pb2 as pb
from service.stubs.graft.v1 import classifier_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow
MODEL = "brittle"
SMALL = encode(random_rgb(8, 8), "PNG")  # like the warm-up images: finite probabilities
LARGE = encode(random_rgb(200, 200), "PNG")  # over the model's 20 kB threshold: NaN


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    scratch = tmp_path_factory.mktemp("brittle")
    repository = ModelRepository(scratch / "models")
    repository.publish(raw_saved_model(scratch / "export", ["a", "b"], nan_for_large_images), MODEL)
    with running_server(repository.root, default_model=MODEL, grpc=True) as running:
        yield running


@pytest.fixture(scope="module")
def http(server: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.http, timeout=60) as client:
        yield client


def _classify(http: httpx.Client, *images: bytes) -> httpx.Response:
    files = [("images", (f"image{i}.png", data, "image/png")) for i, data in enumerate(images)]
    return http.post("/classify", files=files)


def test_nan_probabilities_are_a_json_error_with_a_code_over_http(http: httpx.Client) -> None:
    assert len(LARGE) > 20_000 > len(SMALL)
    assert _classify(http, SMALL).json()["results"][0]["score"] == 0.5
    failed = _classify(http, SMALL, LARGE)
    assert failed.status_code == 500, failed.text
    body = failed.json()
    assert body["error"] == "bad_model_output", body
    assert f"PUT /models/{MODEL}/policy" in body["message"], body
    assert "NaN" not in failed.text.replace("NaN or infinite", "")
    assert _classify(http, SMALL).status_code == 200
    assert http.get("/readyz").status_code == 200


def test_nan_probabilities_are_internal_with_graft_s_code_over_grpc(
    server: RunningServer,
) -> None:
    with grpc.insecure_channel(server.grpc_target or "") as channel:
        classifier = pb_grpc.ImageClassifierStub(channel)
        answer = classifier.Classify(pb.ClassifyRequest(images=[SMALL]), timeout=60)
        assert answer.results[0].score == pytest.approx(0.5)
        with pytest.raises(grpc.RpcError) as refused:
            classifier.Classify(pb.ClassifyRequest(images=[LARGE]), timeout=60)
    assert refused.value.code() == grpc.StatusCode.INTERNAL
    trailers = dict(refused.value.trailing_metadata() or ())
    assert trailers.get("graft-error-code") == "bad_model_output", trailers
    assert "returned NaN or infinite probabilities" in (refused.value.details() or "")


def test_tf_serving_predict_never_answers_nan(server: RunningServer) -> None:
    from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    request = predict_pb2.PredictRequest()
    request.model_spec.name = MODEL
    dims = [tensor_shape_pb2.TensorShapeProto.Dim(size=1)]
    request.inputs["images"].CopyFrom(
        tensor_pb2.TensorProto(
            dtype=types_pb2.DT_STRING,
            tensor_shape=tensor_shape_pb2.TensorShapeProto(dim=dims),
            string_val=[LARGE],
        )
    )
    with grpc.insecure_channel(server.grpc_target or "") as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.Predict(request, timeout=60)
    assert refused.value.code() == grpc.StatusCode.INTERNAL
    assert dict(refused.value.trailing_metadata() or ()).get("graft-error-code") == (
        "bad_model_output"
    )

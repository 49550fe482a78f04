"""The Open Inference Protocol (KServe V2) of a real `graft serve`, spoken with plain httpx and
a raw gRPC channel on graft's own stubs: the request forms tritonclient does not send (typed
gRPC contents, nested JSON pixels), and bad input on every V2 route. Each bad request gets a
clear 4xx (gRPC INVALID_ARGUMENT / NOT_FOUND) naming what is wrong, and the server stays ready.
"""

import base64
import io
import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
from PIL import Image
from support.server import RunningServer, running_server

from service.graft_v1 import ERROR_CODE_KEY
from service.stubs.kserve import grpc_predict_v2_pb2 as pb
from service.stubs.kserve import grpc_predict_v2_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow
MODEL = "colours"
LIMIT = 3  # GRAFT_MAX_IMAGES_PER_REQUEST of this server
HEADER = "Inference-Header-Content-Length"
INFER = f"/v2/models/{MODEL}/infer"


def _png(colour: tuple[int, int, int], size: int = 8) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, "PNG")
    return buffer.getvalue()


RED = _png((220, 20, 20))
RED_PIXELS = np.full((1, 8, 8, 3), (220, 20, 20), dtype=np.uint8)


@pytest.fixture(scope="module")
def server(colour_model_root: Path) -> Iterator[RunningServer]:
    env = {"GRAFT_MAX_IMAGES_PER_REQUEST": str(LIMIT)}
    with running_server(colour_model_root, default_model=MODEL, grpc=True, env=env) as running:
        yield running


@pytest.fixture(scope="module")
def http(server: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.http, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def stub(server: RunningServer) -> Iterator[Any]:
    with grpc.insecure_channel(str(server.grpc_target)) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def _images(*photos: bytes, shape: list[Any] | None = None) -> dict[str, Any]:
    data = [base64.b64encode(photo).decode() for photo in photos]
    return {"name": "images", "datatype": "BYTES", "shape": shape or [len(photos)], "data": data}


def _raw_bytes(*elements: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(element)) + element for element in elements)


def _binary(document: dict[str, Any], *parts: bytes) -> tuple[bytes, dict[str, str]]:
    header = json.dumps(document).encode()
    return header + b"".join(parts), {HEADER: str(len(header))}


def _assert_still_ready(http: httpx.Client) -> None:
    assert http.get("/livez").status_code == 200
    assert http.get("/v2/health/ready").status_code == 200


# -- what works beyond tritonclient's forms -----------------------------------------------


def test_classify_and_v2_agree_on_nested_and_flat_pixels(http: httpx.Client) -> None:
    files = [("images", ("red.png", RED, "image/png"))]
    expected = http.post("/classify", files=files, data={"top_k": "3"}).json()["results"][0]
    for data in (RED_PIXELS.tolist(), RED_PIXELS.reshape(-1).tolist()):
        pixels = {"name": "pixels", "datatype": "UINT8", "shape": [1, 8, 8, 3], "data": data}
        body = {"id": "px", "inputs": [pixels], "parameters": {"top_k": 3}}
        response = http.post(INFER, json=body)
        assert response.status_code == 200, response.text
        found = response.json()
        assert found["id"] == "px" and found["model_name"] == MODEL
        outputs = {output["name"]: output for output in found["outputs"]}
        assert outputs["label"]["data"] == [expected["label"]]
        assert outputs["top_k_label"] == {
            "name": "top_k_label", "datatype": "BYTES", "shape": [1, 3],
            "data": [top["label"] for top in expected["top_k"]],
        }  # fmt: skip
        scores = [top["score"] for top in expected["top_k"]]
        np.testing.assert_allclose(outputs["top_k_score"]["data"], scores, atol=1e-6)


def test_binary_data_output_sends_every_output_as_bytes(http: httpx.Client) -> None:
    body, headers = _binary(
        {
            "inputs": [{"name": "images", "datatype": "BYTES", "shape": [2],
                        "parameters": {"binary_data_size": len(_raw_bytes(RED, RED))}}],
            "outputs": [{"name": "label"}, {"name": "score", "parameters": {"binary_data": False}}],
            "parameters": {"binary_data_output": True},
        },
        _raw_bytes(RED, RED),
    )  # fmt: skip
    response = http.post(INFER, content=body, headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/octet-stream"
    size = int(response.headers[HEADER])
    document = json.loads(response.content[:size])
    label, score = document["outputs"]
    assert label["parameters"]["binary_data_size"] == len(response.content) - size
    assert response.content[size:] == _raw_bytes(b"red", b"red")
    assert len(score["data"]) == 2 and "parameters" not in score


def test_grpc_typed_contents_answer_in_typed_contents(stub: Any) -> None:
    images = pb.ModelInferRequest.InferInputTensor(name="images", datatype="BYTES", shape=[1])
    images.contents.bytes_contents.append(RED)
    typed = stub.ModelInfer(pb.ModelInferRequest(model_name=MODEL, inputs=[images]), timeout=60)
    assert not typed.raw_output_contents
    outputs = {output.name: output for output in typed.outputs}
    assert list(outputs["label"].contents.bytes_contents) == [b"red"]
    assert len(outputs["probabilities"].contents.fp32_contents) == 3

    pixels = pb.ModelInferRequest.InferInputTensor(
        name="pixels", datatype="UINT8", shape=[1, 8, 8, 3]
    )
    pixels.contents.uint_contents.extend(RED_PIXELS.reshape(-1).tolist())
    from_pixels = stub.ModelInfer(
        pb.ModelInferRequest(model_name=MODEL, inputs=[pixels]), timeout=60
    )
    same = {output.name: output for output in from_pixels.outputs}
    np.testing.assert_allclose(
        same["probabilities"].contents.fp32_contents,
        outputs["probabilities"].contents.fp32_contents,
        atol=1e-6,
    )


# -- bad REST requests ------------------------------------------------------------------------

B64 = base64.b64encode(RED).decode()
PIXELS_2x2 = {"name": "pixels", "datatype": "UINT8", "shape": [1, 2, 2, 3]}
# id -> (path, JSON body, or (raw body, headers)), status, graft code, words the error names
REST_CASES: dict[str, tuple[str, Any, int, str, str]] = {
    "wrong datatype": (INFER, {"inputs": [{**_images(RED), "datatype": "FP32"}]},
                       400, "bad_request", "input `images` must be BYTES"),
    "unknown datatype": (INFER, {"inputs": [{**_images(RED), "datatype": "JPEG"}]},
                         400, "bad_request", "unknown datatype 'JPEG'"),
    "shape disagrees with data": (INFER, {"inputs": [_images(RED, shape=[2])]},
                                  400, "bad_request", "has 1 elements but shape [2] holds 2"),
    "negative dim": (INFER, {"inputs": [_images(RED, shape=[-1])]},
                     400, "bad_request", "dimension out of range"),
    "dim past int64": (INFER, {"inputs": [_images(RED, shape=[2**64])]},
                       400, "bad_request", "dimension out of range"),
    "too many dims": (INFER, {"inputs": [_images(RED, shape=[1] * 9)]},
                      400, "bad_request", "shape has 9 dimensions"),
    "huge input name": (INFER, {"inputs": [{**_images(RED), "name": "x" * 10**5}]},
                        400, "bad_request", "an input name is 100000 characters long"),
    "shape not integers": (INFER, {"inputs": [_images(RED, shape=["1"])]},
                           400, "bad_request", "shape must be a list of integers"),
    "huge image count": (INFER, {"inputs": [_images(RED, shape=[10**12])]},
                         400, "bad_request", "1000000000000 images in one request"),
    "huge pixel dims": (INFER, {"inputs": [{**PIXELS_2x2, "shape": [1, 10**5, 10**5, 3],
                                            "data": [0]}]},
                        400, "image_too_large", "10000000000 pixels per image"),
    "more images than the limit": (INFER, {"inputs": [_images(*[RED] * (LIMIT + 1))]},
                                   400, "bad_request", f"the limit is {LIMIT}"),
    "not an image": (INFER, {"inputs": [_images(b"hello, world")]},
                     415, "unsupported_media_type", "image 0"),
    "not base64": (INFER, {"inputs": [{**_images(RED), "data": ["%%%"]}]},
                   400, "bad_request", "element 0 is not valid base64"),
    "pixel values over 255": (INFER, {"inputs": [{**PIXELS_2x2, "data": [300] * 12}]},
                              400, "bad_request", "UINT8 values must be integers from 0 to 255"),
    "ragged pixels": (INFER, {"inputs": [{**PIXELS_2x2, "data": [[[[1, 2, 3]], [[1]]]]}]},
                      400, "bad_request", "input `pixels` data"),
    "pixels not RGB": (INFER, {"inputs": [{**PIXELS_2x2, "shape": [1, 2, 2], "data": [0] * 4}]},
                       400, "bad_request", "shape [N, H, W, 3]"),
    "unknown input": (INFER, {"inputs": [{**_images(RED), "name": "image"}]},
                      400, "bad_request", "send exactly one input"),
    "two inputs": (INFER, {"inputs": [_images(RED), _images(RED)]},
                   400, "bad_request", "send exactly one input"),
    "unknown output": (INFER, {"inputs": [_images(RED)], "outputs": [{"name": "labels"}]},
                       400, "bad_request", "unknown output 'labels'"),
    "top_k zero": (INFER, {"inputs": [_images(RED)], "parameters": {"top_k": 0}},
                   400, "bad_request", "parameters.top_k"),
    "binary flag not a bool": (INFER, {"inputs": [_images(RED)],
                                       "parameters": {"binary_data_output": "yes"}},
                               400, "bad_request", "parameters.binary_data_output"),
    "no inputs": (INFER, {"id": "x"}, 400, "bad_request", "inputs"),
    "no data": (INFER, {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1]}]},
                400, "bad_request", "input `images` has no data"),
    "not JSON": (INFER, (b"{", {}), 400, "bad_request", "not valid"),
    "empty body": (INFER, (b"", {}), 400, "bad_request", "empty"),
    "binary size overruns the body": (
        INFER, _binary({"inputs": [{**PIXELS_2x2, "parameters": {"binary_data_size": 1000}}]},
                       bytes(12)),
        400, "bad_request", "binary_data_size is 1000 but only 12 bytes"),
    "binary size underruns the body": (
        INFER, _binary({"inputs": [{**PIXELS_2x2, "parameters": {"binary_data_size": 12}}]},
                       bytes(19)),
        400, "bad_request", "7 bytes of binary data follow the last input"),
    "binary pixels disagree with the shape": (
        INFER, _binary({"inputs": [{**PIXELS_2x2, "parameters": {"binary_data_size": 11}}]},
                       bytes(11)),
        400, "bad_request", "has 11 bytes but shape [1, 2, 2, 3] holds 12"),
    "BYTES length prefix overruns": (
        INFER, _binary({"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1],
                                    "parameters": {"binary_data_size": 8}}]},
                       struct.pack("<I", 10**6) + b"abcd"),
        400, "bad_request", "element 0 declares 1000000 bytes but only 4 are left"),
    "BYTES fewer elements than the shape": (
        INFER, _binary({"inputs": [{"name": "images", "datatype": "BYTES", "shape": [2],
                                    "parameters": {"binary_data_size": len(_raw_bytes(RED))}}]},
                       _raw_bytes(RED)),
        400, "bad_request", "ends after 1 of the 2 elements"),
    "header length past the body": (INFER, (b'{"inputs": []}', {HEADER: "99999"}),
                                    400, "bad_request", HEADER),
    "data and binary both": (
        INFER, _binary({"inputs": [{**_images(RED), "parameters": {"binary_data_size": 0}}]}),
        400, "bad_request", "both `data` and parameters.binary_data_size"),
    "unknown model": ("/v2/models/nosuch/infer", {"inputs": [_images(RED)]},
                      404, "not_found", "'nosuch' does not exist"),
    "unknown version": (f"/v2/models/{MODEL}/versions/9/infer", {"inputs": [_images(RED)]},
                        404, "not_found", "has no version 9"),
    "version not a number": (f"/v2/models/{MODEL}/versions/latest/infer",
                             {"inputs": [_images(RED)]}, 400, "bad_request", "'latest'"),
    "version too long to parse": (f"/v2/models/{MODEL}/versions/{'9' * 5000}/infer",
                                  {"inputs": [_images(RED)]}, 400, "bad_request", "not a version"),
    "header length too long to parse": (INFER, (b'{"inputs": []}', {HEADER: "9" * 5000}),
                                        400, "bad_request", HEADER),
    "invalid model name": ("/v2/models/Bad.Name/infer", {"inputs": [_images(RED)]},
                           400, "bad_request", "invalid model name"),
}  # fmt: skip
GET_CASES: dict[str, tuple[str, int, str, str]] = {
    "metadata of an unknown model": ("/v2/models/nosuch", 404, "not_found", "'nosuch'"),
    "metadata of an unknown version": (f"/v2/models/{MODEL}/versions/7", 404, "not_found", "7"),
    "readiness of an unknown model": ("/v2/models/nosuch/ready", 404, "not_found", "'nosuch'"),
    "readiness of a non-version": (f"/v2/models/{MODEL}/versions/0/ready", 400, "bad_request",
                                   "positive integers"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(REST_CASES))
def test_bad_rest_inference_is_a_clear_4xx(http: httpx.Client, case: str) -> None:
    path, body, status, code, words = REST_CASES[case]
    if isinstance(body, tuple):
        content, headers = body
        response = http.post(path, content=content, headers=headers)
    else:
        response = http.post(path, json=body)
    assert response.status_code == status, response.text
    error = response.json()
    assert error["code"] == code
    assert words in error["error"], error["error"]
    _assert_still_ready(http)


@pytest.mark.parametrize("case", sorted(GET_CASES))
def test_bad_rest_metadata_and_readiness_are_clear_4xx(http: httpx.Client, case: str) -> None:
    path, status, code, words = GET_CASES[case]
    response = http.get(path)
    assert response.status_code == status, response.text
    assert response.json()["code"] == code and words in response.json()["error"]
    _assert_still_ready(http)


# -- bad gRPC requests ----------------------------------------------------------------------


def _request(*tensors: Any, raw: list[bytes] | None = None, **fields: Any) -> Any:
    fields.setdefault("model_name", MODEL)
    return pb.ModelInferRequest(inputs=list(tensors), raw_input_contents=raw or [], **fields)


def _tensor(
    name: str = "images", datatype: str = "BYTES", shape: Any = (1,), **contents: Any
) -> Any:
    tensor = pb.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=shape)
    for field, values in contents.items():
        getattr(tensor.contents, field).extend(values)
    return tensor


def _red(**overrides: Any) -> Any:
    return _tensor(**{"bytes_contents": [RED], **overrides})


GRPC_CASES: dict[str, tuple[Any, grpc.StatusCode, str, str]] = {
    "wrong datatype": (_request(_tensor(datatype="INT8", int_contents=[1])),
                       grpc.StatusCode.INVALID_ARGUMENT, "bad_request", "must be BYTES"),
    "shape disagrees with contents": (_request(_red(shape=[2])),
                                      grpc.StatusCode.INVALID_ARGUMENT, "bad_request",
                                      "contents.bytes_contents has 1 elements but shape [2]"),
    "negative dim": (_request(_red(shape=[-3])), grpc.StatusCode.INVALID_ARGUMENT,
                     "bad_request", "dimension out of range"),
    "huge pixel dims": (_request(_tensor("pixels", "UINT8", [1, 2**31, 2**31, 3])),
                        grpc.StatusCode.INVALID_ARGUMENT, "image_too_large", "pixels per image"),
    "more images than the limit": (_request(_tensor(shape=[LIMIT + 1]),
                                            raw=[_raw_bytes(*[RED] * (LIMIT + 1))]),
                                   grpc.StatusCode.INVALID_ARGUMENT, "bad_request",
                                   f"the limit is {LIMIT}"),
    "raw contents per input": (_request(_tensor(), raw=[_raw_bytes(RED)] * 2),
                               grpc.StatusCode.INVALID_ARGUMENT, "bad_request",
                               "raw_input_contents has 2 entries for 1 inputs"),
    "raw length prefix overruns": (_request(_tensor(), raw=[struct.pack("<I", 99) + b"ab"]),
                                   grpc.StatusCode.INVALID_ARGUMENT, "bad_request",
                                   "raw_input_contents[0]"),
    "raw pixels disagree with the shape": (
        _request(_tensor("pixels", "UINT8", [1, 2, 2, 3]), raw=[bytes(13)]),
        grpc.StatusCode.INVALID_ARGUMENT, "bad_request", "has 13 bytes but shape"),
    "unknown input": (_request(_red(name="img")), grpc.StatusCode.INVALID_ARGUMENT,
                      "bad_request", "['img']"),
    "unknown output": (_request(_red(), outputs=[
                           pb.ModelInferRequest.InferRequestedOutputTensor(name="logits")]),
                       grpc.StatusCode.INVALID_ARGUMENT, "bad_request", "'logits'"),
    "not an image": (_request(_red(bytes_contents=[b"GIF89a?"])),
                     grpc.StatusCode.INVALID_ARGUMENT, "invalid_image", "image 0"),
    "unknown model": (_request(_red(), model_name="nosuch"), grpc.StatusCode.NOT_FOUND,
                      "not_found", "'nosuch'"),
    "unknown version": (_request(_red(), model_version="5"), grpc.StatusCode.NOT_FOUND,
                        "not_found", "no version 5"),
    "version not a number": (_request(_red(), model_version="v1"),
                             grpc.StatusCode.INVALID_ARGUMENT, "bad_request", "'v1'"),
    "version too long to parse": (_request(_red(), model_version="9" * 5000),
                                  grpc.StatusCode.INVALID_ARGUMENT, "bad_request", "not a version"),
    "no model name": (_request(_red(), model_name=""), grpc.StatusCode.INVALID_ARGUMENT,
                      "bad_request", "invalid model name"),
}  # fmt: skip


def _assert_status(error: grpc.RpcError, status: grpc.StatusCode, code: str, words: str) -> None:
    assert error.code() == status, error.details()
    assert words in (error.details() or ""), error.details()
    assert dict(error.trailing_metadata() or ())[ERROR_CODE_KEY] == code


@pytest.mark.parametrize("case", sorted(GRPC_CASES))
def test_bad_grpc_inference_is_a_clear_status(stub: Any, http: httpx.Client, case: str) -> None:
    request, status, code, words = GRPC_CASES[case]
    with pytest.raises(grpc.RpcError) as raised:
        stub.ModelInfer(request, timeout=60)
    _assert_status(raised.value, status, code, words)
    assert stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready
    _assert_still_ready(http)


def test_bad_grpc_metadata_and_readiness(stub: Any, http: httpx.Client) -> None:
    calls = [
        (stub.ModelMetadata, pb.ModelMetadataRequest(name="nosuch"), grpc.StatusCode.NOT_FOUND),
        (stub.ModelReady, pb.ModelReadyRequest(name=MODEL, version="8"), grpc.StatusCode.NOT_FOUND),
        (stub.ModelReady, pb.ModelReadyRequest(name=MODEL, version="x"),
         grpc.StatusCode.INVALID_ARGUMENT),
    ]  # fmt: skip
    for method, request, status in calls:
        with pytest.raises(grpc.RpcError) as raised:
            method(request, timeout=30)
        assert raised.value.code() == status, raised.value.details()
    with pytest.raises(grpc.RpcError) as raised:
        stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=MODEL), timeout=30)
    assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "publish a version" in (raised.value.details() or "")
    assert stub.ModelReady(pb.ModelReadyRequest(name=MODEL, version="1"), timeout=30).ready
    _assert_still_ready(http)


def test_openapi_lists_the_v2_routes(http: httpx.Client) -> None:
    paths = http.get("/openapi.json").json()["paths"]
    for path in ("/v2", "/v2/health/ready", "/v2/models/{name}/versions/{version}/infer"):
        assert path in paths, sorted(paths)
    assert (
        "application/octet-stream"
        in paths["/v2/models/{name}/infer"]["post"]["requestBody"]["content"]
    )

"""Hostile and unusual input against a real `graft serve` (HTTP and gRPC on loopback).

Every bad request must get a clear 4xx (gRPC INVALID_ARGUMENT / NOT_FOUND) with a message,
never a 5xx, and the service must still be ready afterwards. Unusual but valid images must be
classified, an EXIF-rotated photo like the upright one, and model pushes must be refused with
422 while the serving version carries on.
"""

import base64
import concurrent.futures
import io
import json
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from PIL import Image
from support.bad_images import INVALID, ODD_VALID, exif_rotated_jpeg, png_bomb
from support.images import encode
from support.server import RunningServer, running_server
from support.trained import COLOURS, tinted_photo

from bench.procs import tree
from bench.soak_inputs import exif_rotated_tall_jpeg
from bench.soak_watch import role_of
from service.push.archive import pack_export
from service.store.repository import ModelRepository
from service.stubs.graft.v1 import classifier_pb2 as pb
from service.stubs.graft.v1 import classifier_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow
TOKEN = "test-admin-token-0123456789"
AUTH = {"authorization": f"Bearer {TOKEN}"}
PICKLE = "application/vnd.bentoml+pickle"


# -- an orientation-sensitive model: "top" when the upper half is brighter ---------------------


def updown_export(folder: Path) -> Path:
    """A real Keras model with hand-set weights: logit = 10 x (mean(top) - mean(bottom))."""
    import keras

    from training.export import export_model

    size = 32
    weights = np.zeros((size, size, 3, 2), np.float32)
    weights[: size // 2, :, :, 0] = 10.0 / (size * size * 3 / 2)
    weights[size // 2 :, :, :, 0] = -10.0 / (size * size * 3 / 2)
    weights[..., 1] = -weights[..., 0]
    model = keras.Sequential(
        [
            keras.Input((size, size, 3)),
            keras.layers.Rescaling(1 / 255),
            keras.layers.Flatten(),
            keras.layers.Dense(2, activation="softmax"),
        ]
    )
    model.layers[-1].set_weights([weights.reshape(-1, 2), np.zeros(2, np.float32)])
    return export_model(model, folder, labels=["top", "bottom"], image_size=size, backbone="flat")


def bright_top_photo() -> Image.Image:
    rng = np.random.default_rng(7)
    pixels = np.full((96, 128, 3), 40.0) + rng.normal(0, 10, (96, 128, 3))
    pixels[:48] += 170
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def model_root(tmp_path_factory: pytest.TempPathFactory, colour_export: Path) -> Path:
    root = tmp_path_factory.mktemp("bad-input-models")
    repository = ModelRepository(root)
    repository.publish(colour_export, "colours")
    repository.publish(updown_export(tmp_path_factory.mktemp("updown") / "export"), "updown")
    return root


@pytest.fixture(scope="module")
def server(model_root: Path) -> Iterator[RunningServer]:
    env = {"GRAFT_ADMIN_TOKEN": TOKEN, "GRAFT_SHUTDOWN_DRAIN_S": "1"}
    with running_server(model_root, default_model="colours", grpc=True, env=env) as running:
        yield running


@pytest.fixture(scope="module")
def http(server: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.http, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def classifier(server: RunningServer) -> Iterator[pb_grpc.ImageClassifierStub]:
    assert server.grpc_target is not None
    with grpc.insecure_channel(server.grpc_target) as channel:
        yield pb_grpc.ImageClassifierStub(channel)


def upload(http: httpx.Client, *images: bytes, **fields: str) -> httpx.Response:
    files = [("images", (f"upload{i}.jpg", data, "image/jpeg")) for i, data in enumerate(images)]
    return http.post("/classify", files=files, data=fields)


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "message"} and len(body["message"]) > 15, body
    if code:
        assert body["error"] == code, body
    return body["message"]


# -- images -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(INVALID))
def test_bad_images_get_a_clear_4xx(http: httpx.Client, name: str) -> None:
    make, status = INVALID[name]
    message = assert_error(upload(http, make()), status)
    assert message.startswith("image 0 ")


@pytest.mark.parametrize("name", sorted(ODD_VALID))
def test_unusual_valid_images_are_classified(http: httpx.Client, name: str) -> None:
    response = upload(http, ODD_VALID[name]())
    assert response.status_code == 200, response.text
    assert response.json()["results"][0]["label"] in COLOURS


def test_one_bad_image_among_good_ones_names_its_position(http: httpx.Client) -> None:
    good = tinted_photo("red")
    message = assert_error(upload(http, good, good, INVALID["truncated.jpg"][0]()), 400)
    assert message.startswith("image 2 ")


def test_exif_rotated_photo_is_classified_like_the_upright_one(http: httpx.Client) -> None:
    upright = bright_top_photo()
    stored_sideways = exif_rotated_jpeg(upright, 6)
    without_exif = encode(Image.open(io.BytesIO(stored_sideways)), "JPEG", quality=95)

    def scores(data: bytes) -> list[float]:
        body = {"instances": [{"b64": base64.b64encode(data).decode()}]}
        response = http.post("/v1/models/updown:predict", json=body)
        assert response.status_code == 200, response.text
        return response.json()["predictions"][0]["probabilities"]

    expected = scores(encode(upright, "JPEG", quality=95))
    assert expected[0] > 0.95  # the model sees a bright top
    np.testing.assert_allclose(scores(stored_sideways), expected, atol=0.02)
    assert abs(scores(without_exif)[0] - 0.5) < 0.2  # what the model would see unrotated


# -- request shapes -----------------------------------------------------------------------------


def b64_body(*images: bytes, **fields: object) -> dict:
    return {"images": [{"b64": base64.b64encode(i).decode()} for i in images], **fields}


@pytest.mark.parametrize(
    ("kwargs", "status"),
    [
        ({"content": b""}, 400),  # empty body, no content type
        ({"content": b"", "headers": {"content-type": "application/json"}}, 400),
        ({"content": b"", "headers": {"content-type": "multipart/form-data; boundary=x"}}, 400),
        ({"content": b'{"images": [', "headers": {"content-type": "application/json"}}, 400),
        ({"json": {"images": [{"b64": "not base64!!"}]}}, 400),
        ({"json": {"images": [{"b64": "aGVsbG8"}]}}, 400),  # bad padding
        ({"json": {"images": "aGVsbG8="}}, 400),
        ({"json": {"images": [{"b64": 3}]}}, 400),
        ({"json": {"images": []}}, 400),
        ({"json": [1, 2, 3]}, 400),
        ({"json": {"images": [{"b64": "aGk="}], "top_k": "many"}}, 400),
        ({"content": b"x", "headers": {"content-type": "text/plain"}}, 415),
        ({"content": b"<a/>", "headers": {"content-type": "application/xml"}}, 415),
        ({"content": b"\xff\xd8\xff", "headers": {"content-type": "image/jpeg"}}, 415),
    ],
)
def test_malformed_requests(http: httpx.Client, kwargs: dict, status: int) -> None:
    assert_error(http.post("/classify", **kwargs), status)


@pytest.mark.parametrize("path", ["/classify", "/v1/models/colours:predict"])
def test_deeply_nested_json_is_a_400_not_a_crash(http: httpx.Client, path: str) -> None:
    body = b"[" * 50_000 + b"]" * 50_000
    response = http.post(path, content=body, headers={"content-type": "application/json"})
    assert_error(response, 400, "bad_request")


HUGE_INT = "9" * 5000  # over Python's 4300-digit int-string limit (json.dumps cannot write it)
PHOTO = {"b64": base64.b64encode(tinted_photo("red")).decode()}
V2_IMAGES = {"name": "images", "datatype": "BYTES", "shape": ["HUGE"], "data": [PHOTO["b64"]]}
HUGE_INT_CASES = {  # case -> (method, path, JSON body with "HUGE" for the literal, field named)
    "classify top_k": ("POST", "/classify", {"images": [PHOTO], "top_k": "HUGE"}, "top_k"),
    "negative top_k": ("POST", "/classify", {"images": [PHOTO], "top_k": "-HUGE"}, "top_k"),
    "version": ("POST", "/classify", {"images": [PHOTO], "version": "HUGE"}, "version"),
    "policy pin": ("PUT", "/models/colours/policy", {"pin": "HUGE"}, "pin"),
    "v2 shape": ("POST", "/v2/models/colours/infer", {"inputs": [V2_IMAGES]}, "shape"),
}


@pytest.mark.parametrize("case", sorted(HUGE_INT_CASES))
def test_an_integer_too_long_to_parse_is_a_400_naming_its_field(
    http: httpx.Client, case: str
) -> None:
    method, path, document, field = HUGE_INT_CASES[case]
    body = json.dumps(document).replace('"-HUGE"', f"-{HUGE_INT}").replace('"HUGE"', HUGE_INT)
    headers = {"content-type": "application/json", **AUTH}
    response = http.request(method, path, content=body.encode(), headers=headers)
    assert response.status_code == 400, response.text
    assert field in response.text, response.text
    assert http.get("/livez").status_code == 200


def test_request_names_never_become_metric_labels(
    http: httpx.Client, classifier: pb_grpc.ImageClassifierStub
) -> None:
    """Made-up model names and versions are counted under `unknown`: /metrics stays bounded."""
    photo = {"images": [PHOTO]}
    invented = [f"no-such-model-{i:03d}" for i in range(40)]
    for name in invented:
        assert http.post("/classify", json={**photo, "model": name}).status_code == 404
        assert http.get(f"/v1/models/{name}").status_code == 404
        assert http.get(f"/v1/models/{name}/metadata").status_code == 404
    for version in (7, 12345, 10**17):
        assert http.post("/classify", json={**photo, "version": version}).status_code == 404
    huge_name = "x" * 1_000_000
    with pytest.raises(grpc.RpcError) as refused:
        classifier.Classify(pb.ClassifyRequest(model=huge_name, images=[tinted_photo("red")]))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(refused.value.details() or "") < 500, "the error echoed the whole name"
    assert http.post("/classify", json=photo).status_code == 200
    text = http.get("/metrics").text
    assert not any(name in text for name in invented)
    assert huge_name[:100] not in text
    assert 'model="unknown"' in text and 'model="colours"' in text
    # BentoML's own series too: the route's template, or `other` for a path nothing serves.
    assert http.get("/no/such/path/at/all").status_code == 404
    text = http.get("/metrics").text
    assert 'endpoint="/v1/models/{name}"' in text and 'endpoint="other"' in text
    assert "/no/such/path" not in text and not any(name in text for name in invented)
    for version in ("12345", "100000000000000000"):
        assert f'version="{version}"' not in text
    durations = [line for line in text.splitlines() if "graft_request_duration_seconds" in line]
    assert len("\n".join(durations)) < 200_000, "the request-duration series grew with the names"


def _raw_request(server: RunningServer, head: str, body: bytes = b"") -> tuple[int, bytes]:
    """One HTTP/1.1 request written byte for byte (httpx folds repeated headers)."""
    host, port = server.http.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=60) as connection:
        connection.sendall(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
    status = int(answer.split(b" ", 2)[1])
    return status, answer.partition(b"\r\n\r\n")[2]


@pytest.mark.parametrize(
    "headers",
    [
        f"Content-Type: {PICKLE}\nContent-Type: application/json\n",
        f"Content-Type: application/json\nContent-Type: {PICKLE}\n",
        "Content-Type: application/json\ncontent-type: application/json\n",
    ],
)
def test_a_framing_header_sent_twice_is_refused(server: RunningServer, headers: str) -> None:
    body = json.dumps({"images": [PHOTO]}).encode()
    head = f"POST /classify HTTP/1.1\nHost: x\n{headers}Content-Length: {len(body)}\n"
    head += "Connection: close\n"
    status, answer = _raw_request(server, head, body)
    assert status == 400, answer
    assert b"content-type more than once" in answer


def test_two_content_lengths_are_refused(server: RunningServer) -> None:
    body = json.dumps({"images": [PHOTO]}).encode()
    head = "POST /classify HTTP/1.1\nHost: x\nContent-Type: application/json\n"
    head += f"Content-Length: {len(body)}\nContent-Length: {len(body)}\nConnection: close\n"
    status, answer = _raw_request(server, head, body)
    assert status == 400, answer  # refused by the HTTP parser or by graft, never served


def test_a_content_length_too_long_to_parse_is_refused(server: RunningServer) -> None:
    head = "POST /classify HTTP/1.1\nHost: x\nContent-Type: application/json\n"
    head += f"Content-Length: {'9' * 5000}\nConnection: close\n"
    status, answer = _raw_request(server, head, b"{}")
    assert status in (400, 413), answer  # by the HTTP parser or by graft's guard, never a 5xx


OUTSIDE_HOST = re.compile(rb"""(?:src|href)\s*=\s*["']?(?:https?:)?//""", re.I)
REFERENCE = re.compile(rb"""(?:src|href)\s*=\s*["']([^"']+)["']""", re.I)
CSS_OUTSIDE = re.compile(rb"""url\(\s*["']?(?:https?:)?//|@import""", re.I)


def test_no_page_graft_serves_reaches_another_host(http: httpx.Client) -> None:
    """BentoML's own page (which loads Google Tag Manager) and its assets are not served, `/`
    is graft's own page, and no GET route answers HTML that loads anything from elsewhere (the
    browser's view, with every script run: tests/test_web_page.py)."""
    for path in ("/index.html", "/static_content/swagger-ui-bundle.js", "/assets/x.js"):
        response = http.get(path)
        assert_error(response, 404, "not_found")
        assert response.headers["content-type"] == "application/json", path
    home = http.get("/")
    assert home.status_code == 200 and b"<title>graft" in home.content, home.text[:200]
    paths = [p for p, ops in http.get("/openapi.json").json()["paths"].items() if "get" in ops]
    paths += ["/docs.json", "/livez", "/readyz", "/metrics"]
    pages = set()
    for template in paths:
        response = http.get(template.replace("{name}", "colours").replace("{version}", "1"))
        if "html" in response.headers.get("content-type", ""):
            pages.add(template)
            assert_page_loads_only_from_here(http, response, template)
        assert b"googletagmanager" not in response.content, template
    assert {"/", "/docs"} <= pages


def assert_page_loads_only_from_here(http: httpx.Client, page: httpx.Response, name: str) -> None:
    """No reference to another host; a Content-Security-Policy that lets the browser load only
    from here; every referenced file served here, stylesheets importing nothing from elsewhere."""
    assert not OUTSIDE_HOST.search(page.content), f"{name} loads another host"
    policy = page.headers.get("content-security-policy", "")
    assert "default-src 'none'" in policy and not re.search(r"https?:|\*", policy), policy
    for reference in REFERENCE.findall(page.content):
        if reference.startswith(b"data:"):
            continue
        asset = http.get(page.url.join(reference.decode()))
        assert asset.status_code == 200, f"{name} references {reference!r}: {asset.status_code}"
        if asset.headers["content-type"].startswith("text/css"):
            assert not CSS_OUTSIDE.search(asset.content), f"{reference!r} loads another host"


def test_a_form_field_too_long_to_parse_is_a_400_naming_it(http: httpx.Client) -> None:
    response = upload(http, tinted_photo("red"), top_k=HUGE_INT)
    assert "top_k" in assert_error(response, 400, "bad_request")


@pytest.mark.parametrize(
    "content_type",
    ["multipart/form-data; boundary=xyz", "multipart/form-data", "multipart/form-data; boundary="],
)
def test_broken_multipart_is_a_json_400(http: httpx.Client, content_type: str) -> None:
    response = http.post("/classify", content=b"garbage", headers={"content-type": content_type})
    assert_error(response, 400, "bad_request")


def test_multipart_with_a_huge_boundary(http: httpx.Client) -> None:
    boundary = "b" * 20_000
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="images"; filename="a.jpg"'
            f"\r\nContent-Type: image/jpeg\r\n\r\n"
        ).encode()
        + tinted_photo("red")
        + f"\r\n--{boundary}--\r\n".encode()
    )
    headers = {"content-type": f"multipart/form-data; boundary={boundary}"}
    response = http.post("/classify", content=body, headers=headers)
    assert_error(response, 400)


def test_too_many_images(http: httpx.Client) -> None:
    tiny = encode(Image.new("RGB", (2, 2)), "PNG")
    message = assert_error(http.post("/classify", json=b64_body(*[tiny] * 65)), 400)
    assert "64" in message


def test_body_over_the_limit_is_413_declared_or_streamed(http: httpx.Client) -> None:
    big = b"\x00" * (16 * 1024 * 1024 + 1)
    declared = http.post("/classify", content=big, headers={"content-type": "application/json"})
    assert_error(declared, 413, "payload_too_large")

    def chunks() -> Iterator[bytes]:  # no Content-Length: chunked transfer encoding
        for _ in range(17):
            yield b"\x00" * (1024 * 1024)

    streamed = http.post(
        "/classify", content=chunks(), headers={"content-type": "application/json"}
    )
    assert_error(streamed, 413, "payload_too_large")


@pytest.mark.parametrize(
    ("path", "fields", "status"),
    [
        ("/classify", {"model": "nope"}, 404),
        ("/classify", {"model": "colours", "version": 7}, 404),
        ("/classify", {"model": "../../etc"}, 400),
        ("/v1/models/nope:predict", None, 404),
        ("/v1/models/colours/versions/7:predict", None, 404),
    ],
)
def test_unknown_model_or_version(
    http: httpx.Client, path: str, fields: dict | None, status: int
) -> None:
    photo = tinted_photo("blue")
    if fields is None:
        body = {"instances": [{"b64": base64.b64encode(photo).decode()}]}
    else:
        body = b64_body(photo, **fields)
    assert_error(http.post(path, json=body), status)


ROUTES = [
    ("POST", "/classify"),
    ("POST", "/v1/models/colours:predict"),
    ("POST", "/v1/models/colours/versions/1:predict"),
    ("GET", "/v1/models/colours"),
    ("GET", "/v1/models/colours/metadata"),
    ("GET", "/models"),
    ("PUT", "/models/colours/policy"),
    ("POST", "/models/colours/versions"),
    ("GET", "/readyz"),
    ("GET", "/livez"),
    ("GET", "/metrics"),
    ("POST", "/"),
    ("POST", "/infer"),
    ("POST", "/status"),
    ("POST", "/no/such/route"),
]


@pytest.mark.parametrize(("method", "path"), ROUTES)
def test_pickle_bodies_are_refused_on_every_route(
    http: httpx.Client, method: str, path: str
) -> None:
    canary = Path("/tmp/graft-pickle-canary")
    payload = f"cos\nsystem\n(S'touch {canary}'\ntR.".encode()
    headers = {"content-type": f"{PICKLE}; charset=binary", **AUTH}
    assert_error(http.request(method, path, content=payload, headers=headers), 415)
    assert not canary.exists()


WRONG_METHODS = {  # (method, path) -> the methods that path takes
    ("GET", "/classify"): {"POST"},
    ("PUT", "/explain"): {"POST"},
    ("DELETE", "/models/colours/policy"): {"PUT"},
    ("GET", "/models/colours/versions/1/promotion"): {"PUT"},
    ("POST", "/v1/models/colours/metadata"): {"GET", "HEAD"},
    ("PUT", "/openapi.json"): {"GET", "HEAD"},
    ("GET", "/v2/models/colours/infer"): {"POST"},
    ("OPTIONS", "/v1/models/colours:predict"): {"POST"},  # not also the status route's GET
    ("GET", "/v1/models/colours/versions/1:predict"): {"POST"},
}


@pytest.mark.parametrize(("method", "path"), sorted(WRONG_METHODS))
def test_a_wrong_method_is_a_405_whose_allow_header_lists_the_paths_methods(
    http: httpx.Client, method: str, path: str
) -> None:
    response = http.request(method, path, headers=AUTH)
    assert_error(response, 405)
    allowed = {m.strip() for m in response.headers.get("allow", "").split(",")}
    assert allowed == WRONG_METHODS[method, path], response.headers
    assert all(m in response.json()["message"] for m in allowed)


# -- client disconnects -------------------------------------------------------------------------


def test_client_disconnect_mid_upload_leaves_the_server_healthy(server: RunningServer) -> None:
    host, port = server.http.removeprefix("http://").split(":")
    for _ in range(5):
        with socket.create_connection((host, int(port)), timeout=10) as raw:
            raw.sendall(
                b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 1000000\r\n\r\n" + b'{"images": [{"b64": "' + b"A" * 50_000
            )
    response = httpx.post(f"{server.http}/classify", json=b64_body(tinted_photo("red")), timeout=60)
    assert response.status_code == 200, response.text


# -- gRPC ---------------------------------------------------------------------------------------

GRPC_CASES = {
    "empty request": ([], "", grpc.StatusCode.INVALID_ARGUMENT),
    "zero bytes": ([b""], "", grpc.StatusCode.INVALID_ARGUMENT),
    "html": ([INVALID["html.jpg"][0]()], "", grpc.StatusCode.INVALID_ARGUMENT),
    "truncated": ([INVALID["truncated.jpg"][0]()], "", grpc.StatusCode.INVALID_ARGUMENT),
    "bad crc": ([INVALID["bad-crc.png"][0]()], "", grpc.StatusCode.INVALID_ARGUMENT),
    "bomb": ([png_bomb()], "", grpc.StatusCode.INVALID_ARGUMENT),
    "too many": ([b"\x89PNG\r\n\x1a\n"] * 65, "", grpc.StatusCode.INVALID_ARGUMENT),
    "unknown model": (["photo"], "nope", grpc.StatusCode.NOT_FOUND),
    "bad model name": (["photo"], "../etc", grpc.StatusCode.INVALID_ARGUMENT),
}


@pytest.mark.parametrize("case", sorted(GRPC_CASES))
def test_grpc_bad_input(classifier: pb_grpc.ImageClassifierStub, case: str) -> None:
    images, model, code = GRPC_CASES[case]
    images = [tinted_photo("red") if i == "photo" else i for i in images]
    with pytest.raises(grpc.RpcError) as caught:
        classifier.Classify(pb.ClassifyRequest(images=images, model=model), timeout=60)
    assert caught.value.code() == code, caught.value.details()
    assert len(caught.value.details()) > 15


@pytest.mark.parametrize("name", ["cmyk.jpg", "16bit.png", "animated.gif", "1x10000.png"])
def test_grpc_unusual_valid_images(classifier: pb_grpc.ImageClassifierStub, name: str) -> None:
    response = classifier.Classify(pb.ClassifyRequest(images=[ODD_VALID[name]()]), timeout=60)
    assert response.results[0].label in COLOURS


def test_grpc_deadline_is_deadline_exceeded_and_the_server_recovers(
    classifier: pb_grpc.ImageClassifierStub,
) -> None:
    images = [tinted_photo(c) for c in COLOURS] * 8
    with pytest.raises(grpc.RpcError) as caught:
        classifier.Classify(pb.ClassifyRequest(images=images), timeout=0.001)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    response = classifier.Classify(pb.ClassifyRequest(images=images[:1]), timeout=60)
    assert response.results[0].label == "red"


@pytest.mark.parametrize(
    ("model", "image", "code"),
    [
        ("colours", b"<!DOCTYPE html><html></html>", grpc.StatusCode.INVALID_ARGUMENT),
        ("colours", b"", grpc.StatusCode.INVALID_ARGUMENT),
        ("nope", b"photo", grpc.StatusCode.NOT_FOUND),
    ],
)
def test_grpc_tf_serving_predict_bad_input(
    server: RunningServer, model: str, image: bytes, code: grpc.StatusCode
) -> None:
    from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    data = tinted_photo("red") if image == b"photo" else image
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.inputs["images"].CopyFrom(
        tensor_pb2.TensorProto(
            dtype=types_pb2.DT_STRING,
            tensor_shape=tensor_shape_pb2.TensorShapeProto(
                dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=1)]
            ),
            string_val=[data],
        )
    )
    with grpc.insecure_channel(server.grpc_target or "") as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Predict(request, timeout=60)
    assert caught.value.code() == code, caught.value.details()
    assert len(caught.value.details()) > 15


def test_images_over_the_request_pixel_budget_are_413(http: httpx.Client) -> None:
    """Five 36-megapixel images: each under the per-image limit, 180 MP together."""
    big = encode(Image.new("RGB", (6000, 6000), (200, 30, 30)), "PNG")
    message = assert_error(upload(http, *[big] * 5), 413, "payload_too_large")
    assert "GRAFT_MAX_REQUEST_PIXELS" in message


def _entry_worker(server: RunningServer) -> int:
    """The pid of the BentoML worker that serves `graft` (the entry, models and all here)."""
    root = server.process.pid
    for process in tree(root):
        if role_of(process, root) == "entry":
            return process.pid
    raise AssertionError("no entry worker under graft serve")


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def test_a_request_over_the_re_encode_budget_is_refused_before_any_decode(
    server: RunningServer, http: httpx.Client
) -> None:
    """60 EXIF-rotated 300x9000 JPEGs (2.4 MB on the wire, 162 MP): each would be decoded and
    re-encoded as an 8 MB BMP. The budgets are read from the headers first, so the entry's peak
    RSS stays where it was; checked image by image, it re-encoded 59 of them (+470 MiB) first."""
    tall = exif_rotated_tall_jpeg(300, 9000)
    pid = _entry_worker(server)
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)
    before = _status_kib(pid, "VmRSS")
    message = assert_error(upload(http, *[tall] * 60), 413, "payload_too_large")
    assert "GRAFT_MAX_REENCODED_PIXELS" in message
    assert _status_kib(pid, "VmHWM") - before < 64 * 1024
    within = upload(http, *[exif_rotated_tall_jpeg(300, 8000)] * 6)  # 14.4 MP re-encoded
    assert within.status_code == 200, within.text
    assert len(within.json()["results"]) == 6


def _tf_serving_call(server: RunningServer, method: str, request: object) -> grpc.RpcError:
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    with grpc.insecure_channel(server.grpc_target or "") as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            getattr(stub, method)(request, timeout=60)
    return caught.value


def test_tf_serving_counts_images_before_any_per_image_work(
    server: RunningServer, http: httpx.Client
) -> None:
    """Two million 1x1 pixel images (6 MB), and a million examples sharing one context image,
    are refused from their counts: no PNG is encoded, no image copied per example."""
    from tensorflow.core.example import example_pb2
    from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
    from tensorflow_serving.apis import classification_pb2, predict_pb2

    dims = [tensor_shape_pb2.TensorShapeProto.Dim(size=n) for n in (2_000_000, 1, 1, 3)]
    predict = predict_pb2.PredictRequest()
    predict.model_spec.name, predict.model_spec.signature_name = "colours", "serve_pixels"
    predict.inputs["pixels"].CopyFrom(
        tensor_pb2.TensorProto(
            dtype=types_pb2.DT_UINT8,
            tensor_shape=tensor_shape_pb2.TensorShapeProto(dim=dims),
            tensor_content=bytes(6_000_000),
        )
    )
    classify = classification_pb2.ClassificationRequest()
    classify.model_spec.name = "colours"
    source = classify.input.example_list_with_context
    source.context.features.feature["image/encoded"].bytes_list.value.append(tinted_photo("red"))
    source.examples.extend(example_pb2.Example() for _ in range(1_000_000))
    for method, request in (("Predict", predict), ("Classify", classify)):
        started = time.monotonic()
        refused = _tf_serving_call(server, method, request)
        assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.details()
        assert "images in one request; the limit is" in (refused.details() or "")
        assert time.monotonic() - started < 20, f"{method} did per-image work first"
    assert http.get("/livez").status_code == 200


def test_tf_serving_pixel_images_over_the_pixel_limit_are_refused_from_the_shape(
    server: RunningServer,
) -> None:
    from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
    from tensorflow_serving.apis import predict_pb2

    dims = [tensor_shape_pb2.TensorShapeProto.Dim(size=n) for n in (1, 10_000, 5_000, 3)]
    predict = predict_pb2.PredictRequest()
    predict.model_spec.name, predict.model_spec.signature_name = "colours", "serve_pixels"
    predict.inputs["pixels"].CopyFrom(
        tensor_pb2.TensorProto(
            dtype=types_pb2.DT_UINT8, tensor_shape=tensor_shape_pb2.TensorShapeProto(dim=dims)
        )
    )
    refused = _tf_serving_call(server, "Predict", predict)
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.details()
    assert "GRAFT_MAX_IMAGE_PIXELS" in (refused.details() or "")


# -- model pushes -------------------------------------------------------------------------------


def test_push_requires_the_token(http: httpx.Client, colour_export: Path) -> None:
    archive = pack_export(colour_export)
    assert_error(http.post("/models/colours/versions", content=archive), 401, "unauthorized")
    wrong = {"authorization": "Bearer not-the-token"}
    assert_error(http.post("/models/colours/versions", content=archive, headers=wrong), 401)


@pytest.mark.parametrize(
    ("archive", "reason"),
    [
        (b"", "empty"),
        (b"PK\x03\x04 zip", "not a valid tar.gz"),
        ("dotdot", "climbs out"),
        ("symlink", "is a link"),
        ("tampered", "manifest check failed"),
        ("width", "2 probabilities"),
    ],
)
def test_bad_pushes_are_refused_and_the_serving_version_stays(
    http: httpx.Client,
    model_root: Path,
    colour_export: Path,
    tmp_path: Path,
    archive: object,
    reason: str,
) -> None:
    data = (
        archive
        if isinstance(archive, bytes)
        else _bad_archive(str(archive), colour_export, tmp_path)
    )
    response = http.post("/models/colours/versions", content=data, headers=AUTH)
    assert 400 <= response.status_code < 500, response.text
    assert re.search(reason, response.json()["message"]), response.text
    assert ModelRepository(model_root).versions("colours") == [1]
    assert upload(http, tinted_photo("green")).json()["results"][0]["label"] == "green"


def _bad_archive(kind: str, export: Path, scratch: Path) -> bytes:
    import tarfile

    if kind == "width":  # the updown model's 2 outputs with 3 labels
        return _relabelled(scratch)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as out:
        for path in sorted(export.rglob("*")):
            if path.is_file():
                data = path.read_bytes()
                if kind == "tampered" and path.name == "saved_model.pb":
                    data += b"\x00"
                info = tarfile.TarInfo(path.relative_to(export).as_posix())
                info.size = len(data)
                out.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("../../evil" if kind == "dotdot" else "assets/x")
        if kind == "symlink":
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        if kind in ("dotdot", "symlink"):
            out.addfile(info, io.BytesIO(b""))
    return buffer.getvalue()


def _relabelled(scratch: Path) -> bytes:
    from service.store.manifest import Manifest, hash_tree

    folder = updown_export(scratch / "updown")
    (folder / "assets/labels.txt").write_text("top\nbottom\nsideways\n")
    manifest = Manifest.read(folder)
    manifest.model_copy(
        update={"labels": ["top", "bottom", "sideways"], "files": hash_tree(folder)}
    ).write(folder)
    return pack_export(folder)


def test_a_good_push_is_published_and_served(
    http: httpx.Client, model_root: Path, colour_export: Path
) -> None:
    response = http.post(
        "/models/pushed/versions", content=pack_export(colour_export), headers=AUTH
    )
    assert response.status_code == 201, response.text
    assert response.json()["version"] == 1
    assert ModelRepository(model_root).versions("pushed") == [1]


def test_concurrent_pushes_get_distinct_complete_versions(
    server: RunningServer, model_root: Path, colour_export: Path
) -> None:
    archive = pack_export(colour_export)

    def one(_: int) -> httpx.Response:
        url = f"{server.http}/models/racing/versions"
        return httpx.post(url, content=archive, headers=AUTH, timeout=240)

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        responses = list(pool.map(one, range(3)))
    assert [r.status_code for r in responses] == [201] * 3, [r.text for r in responses]
    assert sorted(r.json()["version"] for r in responses) == [1, 2, 3]
    repository = ModelRepository(model_root)
    assert repository.versions("racing") == [1, 2, 3]
    for version in (1, 2, 3):
        repository.verify("racing", version)


# -- and afterwards -----------------------------------------------------------------------------


def test_still_ready_and_no_5xx_was_ever_answered(http: httpx.Client) -> None:
    assert http.get("/readyz").status_code == 200
    metrics = http.get("/metrics").text
    served = re.findall(r"graft_request_duration_seconds_count{([^}]*)} (\S+)", metrics)
    assert served, "no request metrics"
    fives = [labels for labels, count in served if re.search(r'code="5', labels) and float(count)]
    assert fives == [], fives


# -- graceful stop (last: it stops the server) --------------------------------------------------


def test_sigterm_under_load_drains_then_exits_0(server: RunningServer) -> None:
    """Like Kubernetes: SIGTERM to the main process only, and clients routed here only while
    /readyz says so. Readiness must turn false first, every request sent meanwhile must get
    its 200, and the command must exit 0."""
    photo = tinted_photo("red")
    routing = threading.Event()
    routing.set()
    outcomes: list[str] = []
    readiness: list[tuple[float, str]] = []

    def client() -> None:
        with httpx.Client(base_url=server.http, timeout=30) as http:
            while routing.is_set():
                files = [("images", ("a.jpg", photo, "image/jpeg"))]
                try:
                    outcomes.append(str(http.post("/classify", files=files).status_code))
                except httpx.HTTPError as error:
                    outcomes.append(type(error).__name__)

    def probe() -> None:
        while server.process.poll() is None:
            try:
                status = str(httpx.get(f"{server.http}/readyz", timeout=5).status_code)
            except httpx.HTTPError as error:
                status = type(error).__name__
            readiness.append((time.monotonic(), status))
            if status != "200":
                routing.clear()  # the load balancer takes this replica out
            time.sleep(0.05)

    clients = [threading.Thread(target=client) for _ in range(4)]
    for thread in clients:
        thread.start()
    time.sleep(1.5)
    assert outcomes and set(outcomes) == {"200"}, outcomes
    watcher = threading.Thread(target=probe)
    watcher.start()
    signalled = time.monotonic()
    os.kill(server.process.pid, signal.SIGTERM)
    exit_code = server.process.wait(timeout=90)
    exited = time.monotonic()
    routing.clear()
    watcher.join()
    for thread in clients:
        thread.join()
    assert exit_code == 0, server.log_tail()
    gone = next((t for t, status in readiness if status == "ConnectError"), exited)
    draining = [t for t, status in readiness if status == "503" and t < gone]
    assert draining, f"/readyz never said 503 before the port closed: {readiness[-8:]}"
    assert draining[0] - signalled < 5, "readiness did not turn false promptly"
    assert gone - draining[0] >= 0.9, "the server stopped without draining (drain is 1 s)"
    assert set(outcomes) == {"200"}, sorted(set(outcomes))

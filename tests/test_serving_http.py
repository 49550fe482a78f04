"""HTTP API of a real `graft serve` (2 entry workers) on loopback, with a really trained model."""

import base64
import concurrent.futures
import io
import re
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
from support.metrics import histogram
from support.server import running_server, wait_for_model
from support.trained import COLOURS, tinted_photo

pytestmark = pytest.mark.slow
MODEL = "colours"
CATS = {"tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"}


@pytest.fixture(scope="module")
def model_root(tmp_path_factory, colour_model_root, imagenet_model_root) -> Path:
    """`colours` (the default here) and the ImageNet default side by side."""
    root = tmp_path_factory.mktemp("two-models")
    for source in (colour_model_root, imagenet_model_root):
        shutil.copytree(source, root, dirs_exist_ok=True)
    return root


@pytest.fixture(scope="module")
def server(model_root):
    # The access log shows which entry worker served each request (it is off by default).
    env = {"GRAFT_ACCESS_LOG": "true"}
    with running_server(model_root, default_model=MODEL, workers=2, env=env) as running:
        yield running


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.http, timeout=60) as client:
        yield client


def _files(*images: bytes) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("images", (f"photo{i}.jpg", data, "image/jpeg")) for i, data in enumerate(images)]


def test_real_photos_get_their_colour_in_request_order(http: httpx.Client) -> None:
    photos = [tinted_photo(colour) for colour in COLOURS]
    response = http.post("/classify", files=_files(*photos), data={"top_k": "2"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == MODEL and body["version"] == 1
    assert [r["label"] for r in body["results"]] == list(COLOURS)
    for result in body["results"]:
        assert len(result["top_k"]) == 2
        assert result["top_k"][0] == {"label": result["label"], "score": result["score"]}
        assert result["top_k"][0]["score"] >= result["top_k"][1]["score"]


def test_json_base64_gives_the_same_answer_as_multipart(http: httpx.Client) -> None:
    photo = tinted_photo("green", "PNG")
    multipart = http.post("/classify", files=_files(photo)).json()
    payload = {"images": [{"b64": base64.b64encode(photo).decode()}], "model": MODEL, "top_k": 5}
    as_json = http.post("/classify", json=payload).json()
    assert as_json == multipart
    assert len(as_json["results"][0]["top_k"]) == len(COLOURS)  # top_k capped at C


def test_tf_serving_rest_predict_matches_classify(http: httpx.Client) -> None:
    photo = tinted_photo("blue")
    classify = http.post("/classify", files=_files(photo)).json()["results"][0]
    b64 = {"b64": base64.b64encode(photo).decode()}

    rows = http.post(f"/v1/models/{MODEL}:predict", json={"instances": [b64]})
    assert rows.status_code == 200, rows.text
    prediction = rows.json()["predictions"][0]
    assert prediction["label"] == classify["label"] == "blue"
    by_label = dict(zip(COLOURS, prediction["probabilities"], strict=True))
    for top in classify["top_k"]:
        assert by_label[top["label"]] == pytest.approx(top["score"], abs=1e-6)
    assert sum(prediction["probabilities"]) == pytest.approx(1.0, abs=1e-4)

    columns = http.post(f"/v1/models/{MODEL}/versions/1:predict", json={"inputs": [b64]})
    assert columns.status_code == 200, columns.text
    outputs = columns.json()["outputs"]
    np.testing.assert_allclose(outputs["probabilities"][0], prediction["probabilities"], atol=1e-6)
    assert outputs["label"] == ["blue"]


def test_the_imagenet_default_sees_the_cat_in_a_real_photo(server, http: httpx.Client) -> None:
    from PIL import Image
    from skimage import data

    wait_for_model(server, "imagenet")
    buffer = io.BytesIO()
    Image.fromarray(data.chelsea()).save(buffer, "JPEG", quality=90)
    photo = buffer.getvalue()
    response = http.post("/classify", files=_files(photo), data={"model": "imagenet"})
    assert response.status_code == 200, response.text
    result = response.json()["results"][0]
    assert result["label"] in CATS, result["top_k"]
    assert response.json()["version"] == 1

    rest = http.post("/v1/models/imagenet:predict", json={"instances": [_b64(photo)]}).json()
    probabilities = rest["predictions"][0]["probabilities"]
    assert len(probabilities) == 1000
    assert rest["predictions"][0]["label"] == result["label"]
    assert max(probabilities) == pytest.approx(result["score"], abs=1e-6)


def test_tf_serving_status_and_metadata(http: httpx.Client) -> None:
    status = http.get(f"/v1/models/{MODEL}").json()
    assert status["model_version_status"] == [
        {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}
    ]
    metadata = http.get(f"/v1/models/{MODEL}/versions/1/metadata").json()
    assert metadata["model_spec"] == {"name": MODEL, "signature_name": "", "version": "1"}
    signatures = metadata["metadata"]["signature_def"]["signature_def"]
    serving = signatures["serving_default"]
    assert serving["inputs"]["images"]["dtype"] == "DT_STRING"
    dims = serving["outputs"]["probabilities"]["tensor_shape"]["dim"]
    assert [d["size"] for d in dims] == ["-1", str(len(COLOURS))]
    assert "serve_pixels" in signatures


_RED = base64.b64encode(tinted_photo("red")).decode()
_JSON = {"content-type": "application/json"}
BAD_REQUESTS = {
    "no images": ("POST", "/classify", {"json": {"images": []}}, 400, "bad_request"),
    "bad base64": ("POST", "/classify", {"json": {"images": [{"b64": "@@"}]}}, 400, "bad_request"),
    "bad json": ("POST", "/classify", {"content": b"{", "headers": _JSON}, 400, "bad_request"),
    "html as jpeg": (
        "POST", "/classify", {"files": [("images", ("a.jpg", b"<html>", "image/jpeg"))]},
        415, "unsupported_media_type",
    ),
    "text body": (
        "POST", "/classify", {"content": b"x", "headers": {"content-type": "text/plain"}},
        415, "unsupported_media_type",
    ),
    "unknown model": (
        "POST", "/classify", {"json": {"images": [{"b64": _RED}], "model": "nope"}},
        404, "not_found",
    ),
    "path in model": (
        "POST", "/classify", {"json": {"images": [{"b64": _RED}], "model": "../etc"}},
        400, "bad_request",
    ),
    "top_k 0": ("POST", "/classify", {"json": {"images": [{"b64": _RED}], "top_k": 0}}, 400,
                "bad_request"),
    "unknown version": (
        "POST", f"/v1/models/{MODEL}/versions/9:predict", {"json": {"instances": [{"b64": _RED}]}},
        404, "not_found",
    ),
    "not tf format": ("POST", f"/v1/models/{MODEL}:predict", {"json": {"rows": []}}, 400,
                      "bad_request"),
    "unknown tf model": ("GET", "/v1/models/nope", {}, 404, "not_found"),
}  # fmt: skip


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "code"), BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys()
)
def test_errors_are_data_with_the_right_status(
    http: httpx.Client, method: str, path: str, kwargs: dict, status: int, code: str
) -> None:
    response = http.request(method, path, **kwargs)
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == code and body["message"]


def _b64(data: bytes) -> dict[str, str]:
    return {"b64": base64.b64encode(data).decode()}


@pytest.mark.parametrize(
    "path", ["/classify", f"/v1/models/{MODEL}:predict", "/models/colours/policy", "/readyz", "/"]
)
def test_bentoml_pickle_bodies_are_refused_on_every_route(http: httpx.Client, path: str) -> None:
    # A pickle whose unpickling would run `os.system`; it must never reach a parser.
    payload = b"cos\nsystem\n(S'touch /tmp/graft-pwned'\ntR."
    headers = {"content-type": "application/vnd.bentoml+pickle"}
    for method in ("POST", "PUT"):
        response = http.request(method, path, content=payload, headers=headers)
        assert response.status_code == 415, (method, path, response.text)
        assert response.json()["error"] == "unsupported_media_type"


def test_management_is_off_without_a_token(http: httpx.Client) -> None:
    for method, path in (("GET", "/models"), ("PUT", f"/models/{MODEL}/policy")):
        response = http.request(
            method, path, json={"pin": 1}, headers={"authorization": "Bearer x"}
        )
        assert response.status_code == 403, response.text
        assert response.json()["error"] == "management_disabled"


def test_health_and_openapi(http: httpx.Client) -> None:
    assert http.get("/livez").status_code == 200
    assert http.get("/readyz").status_code == 200
    spec = http.get("/openapi.json").json()
    assert {"/classify", "/v1/models/{name}:predict", "/models/{name}/policy"} <= set(spec["paths"])
    assert "ClassifyResponse" in spec["components"]["schemas"]


def test_concurrent_clients_form_batches_and_metrics_count_them(server, http: httpx.Client) -> None:
    """16 concurrent clients on 2 entry workers: every answer right, some inference batches
    hold > 1 image, and /metrics from either worker counts every request."""
    photos = {colour: tinted_photo(colour) for colour in COLOURS}

    def one(i: int) -> bool:
        colour = COLOURS[i % 3]
        # A new connection per request, so the kernel spreads them over both workers.
        response = httpx.post(f"{server.http}/classify", files=_files(photos[colour]), timeout=60)
        assert response.status_code == 200, response.text
        return response.json()["results"][0]["label"] == colour

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        assert all(pool.map(one, range(96)))

    log = server.log.read_text(errors="replace")
    for worker in (1, 2):
        assert re.search(rf"entry_service:graft:{worker}\].*path=/classify", log), worker
    scrapes = [httpx.get(f"{server.http}/metrics").text for _ in range(4)]
    counts = {
        histogram(m, "graft_request_duration_seconds", route="/classify")["count"] for m in scrapes
    }
    assert len(counts) == 1, f"workers disagree: {counts}"  # one aggregated view
    metrics = scrapes[0]
    batches = histogram(metrics, "graft_inference_batch_size", MODEL)
    assert batches["count"] > 0
    assert batches["count"] < batches["sum"], "no inference batch held more than one image"
    requests = histogram(metrics, "graft_request_duration_seconds", MODEL, route="/classify")
    assert requests["count"] >= 96
    for name in ("graft_inference_duration_seconds", "graft_queue_wait_seconds"):
        assert histogram(metrics, name)["count"] > 0, name
    assert histogram(metrics, "graft_prediction_confidence", MODEL)["count"] >= 96
    assert re.search(r'graft_predictions_total{[^}]*label="red"[^}]*} [1-9]', metrics)
    assert re.search(rf'graft_model_active_version{{model="{MODEL}"}} 1\.0', metrics)
    assert re.search(rf'graft_model_loads_total{{model="{MODEL}",outcome="loaded"}} 1\.0', metrics)
    assert re.search(r'graft_requests_rejected_total{reason="[a-z_]+"} [1-9]', metrics)
    assert "graft_images_in_flight 0.0" in metrics  # every admitted image was answered


def test_python_client_classifies_paths_and_bytes_and_raises_graft_errors(
    server, tmp_path: Path
) -> None:
    from service.client.http import GraftClient
    from service.errors import ModelNotFound, UnsupportedMediaType

    photo = tmp_path / "green.png"
    photo.write_bytes(tinted_photo("green", "PNG"))
    with GraftClient(server.http) as client:
        assert client.ready()
        response = client.classify([photo, tinted_photo("blue")], top_k=1)
        assert (response.model, response.version) == (MODEL, 1)
        assert [r.label for r in response.results] == ["green", "blue"]
        assert all(len(r.top_k) == 1 for r in response.results)
        with pytest.raises(ModelNotFound, match="nope"):
            client.classify([photo], model="nope")
        with pytest.raises(UnsupportedMediaType, match="not an image format"):
            client.classify([b"plain text, not a photo"])

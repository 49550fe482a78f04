"""Explanations: the export's `explain` signature (Grad-CAM), `POST /explain` on a real server,
`graft explain`, and a version exported before explanations.

The Grad-CAM check uses a tiny convolutional model trained to tell images with a bright square
(in any corner) from plain noise: its decision depends on one region, so the heatmap of the
"square" class must peak there, wherever the square is.
"""

import asyncio
import base64
import io
import json
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from support.bad_images import INVALID
from support.cli import run_graft
from support.images import encode
from support.server import (
    RunningServer,
    paused_inference,
    running_server,
    wait_for_images_in_flight,
)
from support.trained import COLOURS, tinted_photo

from service.errors import ExplanationsUnavailable
from service.store.layout import (
    EXPLAIN_SIGNATURE,
    LABELS_FILE,
    PIXELS_SIGNATURE,
    PREPROCESS_SIGNATURE,
    SERVING_SIGNATURE,
)
from service.store.manifest import Manifest, hash_tree
from service.store.repository import ModelRepository

pytestmark = pytest.mark.slow
SIZE = 32
SQUARE = 10  # side of the bright square, in pixels
CORNERS = ("top-left", "bottom-right", "top-right")
MAX_IMAGES = 4  # GRAFT_MAX_IMAGES_PER_REQUEST and GRAFT_MAX_QUEUE of the test server


# -- a model whose decision depends on one region -------------------------------------------


def square_image(corner: str | None, seed: int) -> np.ndarray:
    """Noise in [0, 120), plus a white SQUARE x SQUARE square in `corner` (None: no square)."""
    rng = np.random.default_rng(seed)
    pixels = rng.uniform(0, 120, size=(SIZE, SIZE, 3)).astype(np.float32)
    if corner is not None:
        rows, cols = _square(corner)
        pixels[rows, cols] = 255.0
    return pixels


def _square(corner: str) -> tuple[slice, slice]:
    top, left = corner.split("-")
    rows = slice(1, 1 + SQUARE) if top == "top" else slice(SIZE - 1 - SQUARE, SIZE - 1)
    cols = slice(1, 1 + SQUARE) if left == "left" else slice(SIZE - 1 - SQUARE, SIZE - 1)
    return rows, cols


def train_square_model():  # -> keras.Model
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((SIZE, SIZE, 3)),
            keras.layers.Rescaling(1 / 255),
            keras.layers.Conv2D(8, 3, padding="same", activation="relu"),
            keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(2, activation="softmax"),
        ]
    )
    corners = ("top-left", "top-right", "bottom-left", "bottom-right")
    images, labels = [], []
    for index in range(320):
        has_square = index % 2 == 0
        images.append(square_image(corners[index // 2 % 4] if has_square else None, index))
        labels.append(0 if has_square else 1)
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="sparse_categorical_crossentropy")
    model.fit(np.stack(images), np.array(labels), batch_size=32, epochs=10, verbose=0)
    return model


@pytest.fixture(scope="module")
def square_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from training.export import export_model

    return export_model(
        train_square_model(),
        tmp_path_factory.mktemp("square") / "export",
        labels=["square", "plain"],
        image_size=SIZE,
        backbone="tiny-cnn",
        accelerated=False,
    )


def without_explain(export_dir: Path, target: Path) -> Path:
    """The same export as one made before explanations: its signatures but `explain`."""
    import tensorflow as tf

    module = tf.saved_model.load(str(export_dir))
    root = tf.Module()
    root.restored = module  # keeps the variables the signatures read
    kept = (SERVING_SIGNATURE, PIXELS_SIGNATURE, PREPROCESS_SIGNATURE)
    tf.saved_model.save(root, str(target), signatures={k: module.signatures[k] for k in kept})
    (target / LABELS_FILE).parent.mkdir(exist_ok=True)
    shutil.copyfile(export_dir / LABELS_FILE, target / LABELS_FILE)
    manifest = Manifest.read(export_dir)
    old = manifest.model_copy(
        update={"signatures": list(kept), "accelerated": None, "files": hash_tree(target)}
    )
    old.write(target)
    return target


def png(image: np.ndarray) -> bytes:
    return encode(np.clip(image, 0, 255).astype(np.uint8), "PNG")


# -- the export -------------------------------------------------------------------------------


def test_the_heatmap_peaks_where_the_square_is(square_export: Path) -> None:
    import tensorflow as tf

    module = tf.saved_model.load(str(square_export))
    assert EXPLAIN_SIGNATURE in module.signatures
    assert EXPLAIN_SIGNATURE in Manifest.read(square_export).signatures
    cases = [(corner, seed) for corner in CORNERS for seed in (1001, 1002)]
    images = tf.constant([png(square_image(corner, seed)) for corner, seed in cases])
    explained = module.signatures[EXPLAIN_SIGNATURE](images=images)
    probabilities = explained["probabilities"].numpy()
    heatmaps = explained["heatmap"].numpy()
    assert heatmaps.shape == (len(cases), SIZE, SIZE) and heatmaps.dtype == np.float32
    assert heatmaps.min() >= 0.0 and heatmaps.max() <= 1.0
    # The explained probabilities are serving_default's: the same model, the same decode.
    served = module.signatures[SERVING_SIGNATURE](images=images)["probabilities"].numpy()
    np.testing.assert_allclose(probabilities, served, atol=1e-5)
    assert (probabilities.argmax(axis=1) == 0).all(), f"not all seen as square: {probabilities}"
    for (corner, _), heatmap in zip(cases, heatmaps, strict=True):
        rows, cols = _square(corner)
        inside = np.zeros_like(heatmap, dtype=bool)
        inside[rows, cols] = True
        assert heatmap.max() == pytest.approx(1.0)  # scaled to its peak: not constant
        peak = np.unravel_index(heatmap.argmax(), heatmap.shape)
        near = np.zeros_like(inside)  # the square and a 3-pixel margin (upsampling blurs it)
        near[max(rows.start - 3, 0) : rows.stop + 3, max(cols.start - 3, 0) : cols.stop + 3] = True
        assert near[peak], f"{corner}: the heatmap peaks at {peak}, away from the square"
        assert heatmap[inside].mean() > 3 * heatmap[~near].mean(), corner


def test_explain_images_renders_the_heatmaps(square_export: Path) -> None:
    from training.explain import explain_images

    images = [png(square_image("top-left", 7)), encode(Image.new("L", (50, 20), 90), "JPEG")]
    explanations = explain_images(square_export, images)
    assert len(explanations) == 2
    for explanation in explanations:
        assert explanation.probabilities.shape == (2,)
        assert explanation.heatmap.shape == (SIZE, SIZE)
        heatmap = Image.open(io.BytesIO(explanation.heatmap_png))
        overlay = Image.open(io.BytesIO(explanation.overlay_png))
        assert (heatmap.format, heatmap.mode, heatmap.size) == ("PNG", "L", (SIZE, SIZE))
        assert (overlay.format, overlay.mode, overlay.size) == ("PNG", "RGB", (SIZE, SIZE))
        levels = np.asarray(heatmap, dtype=np.float32) / 255
        np.testing.assert_allclose(levels, explanation.heatmap, atol=1 / 255)
    # The overlay is the image under the colours: the white square shows through, brighter.
    overlay = np.asarray(Image.open(io.BytesIO(explanations[0].overlay_png)), dtype=np.float32)
    rows, cols = _square("top-left")
    assert overlay[rows, cols].mean() > overlay[SIZE // 2 :, SIZE // 2 :].mean()


def test_an_export_without_explain_is_refused_clearly(square_export: Path, tmp_path: Path) -> None:
    from training.explain import explain_images

    old = without_explain(square_export, tmp_path / "old")
    with pytest.raises(ExplanationsUnavailable, match="Retrain it with `graft train`"):
        explain_images(old, [png(square_image("top-left", 1))])


# -- the server: one inference process of its own (the socket between entry and models) -------


@pytest.fixture(scope="module")
def model_root(tmp_path_factory: pytest.TempPathFactory, colour_export: Path) -> Path:
    root = tmp_path_factory.mktemp("explain") / "models"
    repository = ModelRepository(root)
    repository.publish(colour_export, "colours")  # with onnx/model.onnx: classified on ONNX
    old = without_explain(colour_export, tmp_path_factory.mktemp("old") / "export")
    repository.publish(old, "old")
    return root


@pytest.fixture(scope="module")
def server(model_root: Path) -> Iterator[RunningServer]:
    limits = {"GRAFT_MAX_IMAGES_PER_REQUEST": str(MAX_IMAGES), "GRAFT_MAX_QUEUE": str(MAX_IMAGES)}
    with running_server(
        model_root, default_model="colours", separate_inference=True, env=limits
    ) as running:
        yield running


@pytest.fixture(scope="module")
def http(server: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.http, timeout=60) as client:
        yield client


def _files(*images: bytes) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("images", (f"photo{i}.jpg", data, "image/jpeg")) for i, data in enumerate(images)]


def _decoded(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64, validate=True)))
    image.load()
    return image


def test_explain_answers_multipart_and_json_like_classify(http: httpx.Client) -> None:
    photos = [tinted_photo(colour) for colour in COLOURS[:2]]
    multipart = http.post("/explain", files=_files(*photos), data={"top_k": "2"})
    assert multipart.status_code == 200, multipart.text
    body = multipart.json()
    assert (body["model"], body["version"]) == ("colours", 1)
    classified = http.post("/classify", files=_files(*photos), data={"top_k": "2"}).json()
    assert [e["label"] for e in body["explanations"]] == list(COLOURS[:2])
    for explanation, result in zip(body["explanations"], classified["results"], strict=True):
        assert explanation["label"] == result["label"]
        # ONNX Runtime classifies, TensorFlow explains: the same numbers within 1e-4.
        assert explanation["score"] == pytest.approx(result["score"], abs=1e-4)
        assert [t["label"] for t in explanation["top_k"]] == [t["label"] for t in result["top_k"]]
        heatmap = _decoded(explanation["heatmap_png"])
        overlay = _decoded(explanation["overlay_png"])
        assert (heatmap.mode, heatmap.size) == ("L", (32, 32))
        assert (overlay.mode, overlay.size) == ("RGB", (32, 32))
    payload = {"images": [{"b64": base64.b64encode(photos[1]).decode()}], "top_k": 1}
    as_json = http.post("/explain", json=payload)
    assert as_json.status_code == 200, as_json.text
    only = as_json.json()["explanations"][0]
    assert only["label"] == COLOURS[1] and len(only["top_k"]) == 1
    alone = np.asarray(_decoded(only["heatmap_png"]), dtype=np.int16)
    in_batch = np.asarray(_decoded(body["explanations"][1]["heatmap_png"]), dtype=np.int16)
    assert np.abs(alone - in_batch).max() <= 1  # the same map, batched or not (8-bit levels)


@pytest.mark.parametrize("name", sorted(INVALID))
def test_bad_images_get_the_same_4xx_as_classify(http: httpx.Client, name: str) -> None:
    make, status = INVALID[name]
    answers = [http.post(route, files=_files(make())) for route in ("/classify", "/explain")]
    assert [a.status_code for a in answers] == [status, status], [a.text for a in answers]
    assert answers[0].json()["error"] == answers[1].json()["error"]
    assert answers[1].json()["message"]


def _red_json(**fields: object) -> dict:
    return {"json": {"images": [{"b64": _b64(tinted_photo("red"))}], **fields}}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


BAD_REQUESTS = {
    "too many images": (lambda: {"files": _files(*[tinted_photo("red")] * (MAX_IMAGES + 1))}, 400),
    "no images": (lambda: {"json": {"images": []}}, 400),
    "not base64": (lambda: {"json": {"images": [{"b64": "not base64!"}]}}, 400),
    "top_k 0": (lambda: _red_json(top_k=0), 400),
    "unknown model": (lambda: _red_json(model="nope"), 404),
    "bad model name": (lambda: _red_json(model="../etc"), 400),
    "text body": (lambda: {"content": b"x", "headers": {"content-type": "text/plain"}}, 415),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_requests_get_the_same_status_as_classify(http: httpx.Client, case: str) -> None:
    make, status = BAD_REQUESTS[case]
    answers = [http.post(route, **make()) for route in ("/classify", "/explain")]
    assert [a.status_code for a in answers] == [status, status], [a.text for a in answers]
    assert answers[0].json()["error"] == answers[1].json()["error"]
    if status == 415:
        assert "/explain takes" in answers[1].json()["message"]


def test_a_version_exported_before_explanations_is_a_clear_400(
    http: httpx.Client, server: RunningServer
) -> None:
    photos = [tinted_photo("red"), tinted_photo("blue")]
    classified = http.post("/classify", files=_files(*photos), data={"model": "old"})
    assert classified.status_code == 200, classified.text  # served as before
    refused = http.post("/explain", files=_files(*photos), data={"model": "old"})
    assert refused.status_code == 400, refused.text
    body = refused.json()
    assert body["error"] == "explanations_unavailable"
    assert "model 'old' version 1 cannot explain" in body["message"]
    assert "retrain" in body["message"].lower() and not body["message"].startswith("image ")
    assert httpx.get(f"{server.http}/readyz", timeout=10).status_code == 200


def test_explain_counts_against_the_same_admission_queue(
    http: httpx.Client, server: RunningServer
) -> None:
    held: dict[str, httpx.Response] = {}
    photos = [tinted_photo("green")] * MAX_IMAGES

    def classify() -> None:
        with httpx.Client(base_url=server.http, timeout=120) as client:
            held["classify"] = client.post("/classify", files=_files(*photos))

    with paused_inference(server):
        sender = threading.Thread(target=classify)
        sender.start()
        wait_for_images_in_flight(server, MAX_IMAGES)  # the queue is full
        refused = http.post("/explain", files=_files(tinted_photo("red")))
    sender.join(120)
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"] == "overloaded" and "Retry-After" in refused.headers
    assert held["classify"].status_code == 200
    assert http.post("/explain", files=_files(tinted_photo("red"))).status_code == 200


# -- the one-process layout: the Gateway on the entry worker's own inference side -------------


def test_the_one_process_layout_explains(model_root: Path, tmp_path: Path) -> None:
    from service.app.in_process import InProcessInference
    from service.gateway import Gateway
    from service.settings import GraftSettings

    # A copy: the running server keeps its load records in its own root.
    root = shutil.copytree(model_root, tmp_path / "models", ignore=shutil.ignore_patterns(".*"))
    settings = GraftSettings(model_root=root, default_model="colours")

    async def explain() -> list:
        backend = InProcessInference(settings)
        backend.start()
        gateway = Gateway(backend, settings)
        try:
            await backend.metadata("colours", 1)  # waits until the side is open
            await gateway.refresh_status()
            answer = await gateway.explain(
                [tinted_photo("blue")], model=None, version=None, top_k=2, protocol="test"
            )
            with pytest.raises(ExplanationsUnavailable):
                await gateway.explain(
                    [tinted_photo("blue")], model="old", version=None, top_k=2, protocol="test"
                )
            return answer.explanations
        finally:
            await backend.close()

    explanations = asyncio.run(explain())
    assert [e.label for e in explanations] == ["blue"]
    assert _decoded(explanations[0].heatmap_png).size == (32, 32)


# -- graft explain --------------------------------------------------------------------------


def test_graft_explain_writes_the_pngs_and_a_summary(model_root: Path, tmp_path: Path) -> None:
    photos = []
    for colour in ("red", "green"):
        photos.append(tmp_path / f"{colour}.jpg")
        photos[-1].write_bytes(tinted_photo(colour))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(INVALID["truncated.jpg"][0]())
    out = tmp_path / "out"
    result = run_graft(
        "explain", *map(str, [*photos, broken]), "--name", "colours",
        "--model-root", str(model_root), "--out", str(out), "--top-k", "2",
    )  # fmt: skip
    assert result.returncode == 1, result.stderr  # one image failed, and says so
    assert f"error: {broken}:" in result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["label"] for line in lines[:-1]] == ["red", "green"]
    for line, photo in zip(lines[:-1], photos, strict=True):
        assert line["image"] == str(photo) and len(line["top_k"]) == 2
        assert line["overlay"] == str(out / f"{photo.stem}.overlay.png")
        assert Image.open(line["overlay"]).size == (32, 32)
        assert Image.open(line["heatmap"]).mode == "L"
    assert lines[-1] == {
        "model": "colours", "version": 1, "explained": 2, "failed": 1, "out": str(out),
    }  # fmt: skip


def test_graft_explain_of_an_old_export_is_one_clear_line(model_root: Path, tmp_path: Path) -> None:
    photo = tmp_path / "red.jpg"
    photo.write_bytes(tinted_photo("red"))
    result = run_graft("explain", str(photo), "--name", "old", "--model-root", str(model_root))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {ExplanationsUnavailable.of('old v1').message}"
    )
    assert "Traceback" not in result.stderr


def test_graft_explain_defaults_to_the_served_version_not_the_newest(
    colour_export: Path, tmp_path: Path
) -> None:
    from service.store.promotion import publish_candidate
    from service.wire import Promotion, PromotionState

    repository = ModelRepository(tmp_path / "models")
    repository.publish(colour_export, "colours")  # v1: promoted, served
    rejected = Promotion(state=PromotionState.REJECTED, decided_by="gate", reason="worse")
    publish_candidate(repository, colour_export, "colours", rejected)  # v2: newest, never served
    photo = tmp_path / "red.jpg"
    photo.write_bytes(tinted_photo("red"))
    result = run_graft(
        "explain", str(photo), "--name", "colours", "--model-root", str(repository.root),
        "--out", str(tmp_path / "out"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1])["version"] == 1

"""A whole `graft serve` killed with SIGKILL in the middle of an HTTP push, then restarted.

The kill must land mid-push, not by timing luck: the test watches the model's folder and kills
the server's process group the moment the push's staging folder appears there, i.e. while the
checked model is being copied into the repository. A 100 MB model (zero weights, so the upload
stays small) keeps that window open for a good part of a second, and the test asserts the
staging folder is still there afterwards, which proves the kill came before the rename.

Also here, on a server whose request deadline is 1 s: a push whose model check takes longer
than that still succeeds, because a push is bounded by GRAFT_PUSH_CHECK_TIMEOUT_S instead.
"""

import io
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image
from support.exports import make_tiny_export
from support.server import RunningServer, kill_9, running_server

from service.push.archive import pack_export
from service.store.repository import STAGING_PREFIX, ModelRepository

pytestmark = pytest.mark.slow
TOKEN = "test-admin-token-crash"
AUTH = {"authorization": f"Bearer {TOKEN}"}
MODEL = "m"
REQUEST_TIMEOUT_S = 1.0


def zero_weight_export(folder: Path) -> Path:
    """A real, loadable export with a 100 MB weights shard that gzip shrinks to ~0.2 MB."""
    import keras

    from training.export import export_model

    model = keras.Sequential(
        [
            keras.Input((32, 32, 3)),
            keras.layers.Flatten(),
            keras.layers.Dense(4096, kernel_initializer="zeros"),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )
    return export_model(
        model, folder, labels=["red", "green", "blue"], image_size=32, backbone="flat"
    )


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_export(tmp_path_factory.mktemp("tiny") / "export")


@pytest.fixture(scope="module")
def tiny_archive(tiny_export: Path) -> bytes:
    return pack_export(tiny_export)


@pytest.fixture(scope="module")
def heavy_archive(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return pack_export(zero_weight_export(tmp_path_factory.mktemp("heavy") / "export"))


@pytest.fixture(scope="module")
def model_root(tmp_path_factory: pytest.TempPathFactory, tiny_export: Path) -> Path:
    """A repository holding MODEL version 1, the tiny model."""
    root = tmp_path_factory.mktemp("crash") / "models"
    ModelRepository(root).publish(tiny_export, MODEL)
    return root


@pytest.fixture(scope="module")
def first_server(model_root: Path) -> Iterator[RunningServer]:
    """A server with a 1 s request deadline; the kill test ends it, so that test comes last."""
    env = {"GRAFT_ADMIN_TOKEN": TOKEN, "GRAFT_REQUEST_TIMEOUT_S": str(REQUEST_TIMEOUT_S)}
    with running_server(model_root, default_model=MODEL, env=env) as server:
        yield server


def push(server: RunningServer, archive: bytes) -> httpx.Response:
    return httpx.post(
        f"{server.http}/models/{MODEL}/versions", content=archive, headers=AUTH, timeout=120
    )


def classify(server: RunningServer) -> httpx.Response:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(buffer, format="PNG")
    files = [("images", ("red.png", buffer.getvalue(), "image/png"))]
    return httpx.post(f"{server.http}/classify", files=files, timeout=60)


def staging_dirs(model_dir: Path) -> list[Path]:
    return sorted(model_dir.glob(f"{STAGING_PREFIX}*"))


def kill_once_publishing(server: RunningServer, model_dir: Path, archive: bytes) -> Path:
    """Push `archive` and SIGKILL the whole server as soon as its staging folder appears."""
    answer: dict[str, object] = {}

    def send() -> None:
        try:
            answer["response"] = push(server, archive)
        except httpx.HTTPError as error:  # expected: the server dies under the request
            answer["error"] = error

    sender = threading.Thread(target=send)
    sender.start()
    deadline = time.monotonic() + 120
    while not (found := staging_dirs(model_dir)):
        assert sender.is_alive(), f"the push ended before publishing: {answer}"
        assert time.monotonic() < deadline, f"no staging folder appeared:\n{server.log_tail()}"
        time.sleep(0.001)
    kill_9(server)
    sender.join()
    assert "error" in answer, f"the push was answered although killed: {answer}"
    return found[0]


def test_a_push_check_slower_than_the_request_deadline_succeeds(
    first_server: RunningServer, model_root: Path, heavy_archive: bytes
) -> None:
    before = ModelRepository(model_root).versions(MODEL)[-1]
    started = time.monotonic()
    response = push(first_server, heavy_archive)
    took = time.monotonic() - started
    assert response.status_code == 201, response.text
    assert response.json()["version"] == before + 1
    # Loading and warming up 100 MB of weights takes seconds (GRAFT_PUSH_CHECK_TIMEOUT_S=1
    # makes this push 504); were it quicker than the deadline, this test would prove nothing.
    assert took > REQUEST_TIMEOUT_S, f"the push took only {took:.2f} s"


def test_kill_9_mid_push_then_restart_serves_the_last_complete_version(
    first_server: RunningServer, model_root: Path, tiny_archive: bytes, heavy_archive: bytes
) -> None:
    model_dir = model_root / MODEL
    last = ModelRepository(model_root).versions(MODEL)[-1]
    staging = kill_once_publishing(first_server, model_dir, heavy_archive)
    assert staging.is_dir(), "the kill came after the publish, not in the middle of it"
    assert ModelRepository(model_root).versions(MODEL)[-1] == last  # the half copy is no version
    assert ModelRepository(model_root).scratch_folders(), "the push left no scratch to clean up"

    with running_server(
        model_root, default_model=MODEL, env={"GRAFT_ADMIN_TOKEN": TOKEN}
    ) as server:
        served = classify(server)
        assert served.status_code == 200, served.text
        assert served.json()["version"] == last
        listed = httpx.get(f"{server.http}/models", headers=AUTH, timeout=30).json()
        versions = [
            v["version"] for m in listed["models"] if m["name"] == MODEL for v in m["versions"]
        ]
        assert versions == list(range(1, last + 1)), listed

        pushed = push(server, tiny_archive)
        assert pushed.status_code == 201, pushed.text
        assert pushed.json()["version"] == last + 1  # the killed push took no version number
        assert staging_dirs(model_dir) == [], "the dead push's staging folder was not removed"
        scratch = ModelRepository(model_root).scratch_folders()
        assert scratch == [], f"the dead push's scratch folder was not removed: {scratch}"
        wait_for_version(server, last + 1)


def wait_for_version(server: RunningServer, version: int, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if classify(server).json().get("version") == version:
            return
        time.sleep(0.5)
    pytest.fail(f"version {version} never served:\n{server.log_tail()}")

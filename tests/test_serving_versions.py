"""Model versions on a live server: hot swap under load, a corrupted version, pin/unpin, push,
and the management API's bearer token. The tests run in file order on one server."""

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
from support.server import model_worker, running_server
from support.trained import tinted_photo

from service.push.archive import pack_export
from service.store.repository import ModelRepository

pytestmark = pytest.mark.slow
MODEL = "colours"
TOKEN = "test-admin-token"
ADMIN = {"authorization": f"Bearer {TOKEN}"}
SWAP_DEADLINE_S = 10.0


@pytest.fixture(scope="module")
def model_root(tmp_path_factory: pytest.TempPathFactory, colour_export: Path) -> Path:
    root = tmp_path_factory.mktemp("versioned")
    ModelRepository(root).publish(colour_export, MODEL)
    return root


@pytest.fixture(scope="module")
def server(model_root: Path):
    settings = {"GRAFT_ADMIN_TOKEN": TOKEN, "GRAFT_POLL_INTERVAL_S": "0.5"}
    with running_server(model_root, default_model=MODEL, env=settings) as running:
        yield running


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.http, timeout=60) as client:
        yield client


def _classify(http: httpx.Client, version: int | None = None) -> httpx.Response:
    data = {"version": str(version)} if version is not None else {}
    files = [("images", ("red.jpg", tinted_photo("red"), "image/jpeg"))]
    return http.post("/classify", files=files, data=data)


def _served_version(http: httpx.Client) -> int:
    response = _classify(http)
    assert response.status_code == 200, response.text
    return response.json()["version"]


def _wait_for_version(http: httpx.Client, version: int, timeout_s: float = SWAP_DEADLINE_S) -> None:
    deadline = time.monotonic() + timeout_s
    while _served_version(http) != version:
        assert time.monotonic() < deadline, f"still not serving version {version}"
        time.sleep(0.2)


def _model(http: httpx.Client) -> dict:
    response = http.get("/models", headers=ADMIN)
    assert response.status_code == 200, response.text
    return next(m for m in response.json()["models"] if m["name"] == MODEL)


@pytest.mark.parametrize(
    "headers",
    [{}, {"authorization": "Bearer wrong"}, {"authorization": TOKEN}, {"authorization": "Basic x"}],
)
def test_management_without_the_right_token_is_401(http: httpx.Client, headers: dict) -> None:
    for method, path, body in (
        ("GET", "/models", None),
        ("PUT", f"/models/{MODEL}/policy", {"pin": 1}),
        ("POST", f"/models/{MODEL}/versions", None),
    ):
        response = http.request(method, path, json=body, headers=headers)
        assert response.status_code == 401, (method, path, response.text)
        assert response.json()["error"] == "unauthorized"
        assert response.headers["www-authenticate"].startswith("Bearer")
    assert _model(http)["pin"] is None  # nothing changed


def test_models_lists_states_active_version_and_pin(http: httpx.Client) -> None:
    model = _model(http)
    assert model.pop("policy")["pin"] is None  # policy.json as the version manager read it
    assert model.pop("traffic") is None  # no canary, no shadow
    for version in model["versions"]:
        version.pop("promotion", None)  # the promotion gate's record
    assert model == {
        "name": MODEL,
        "active_version": 1,
        "previous_version": None,
        "pin": None,
        "versions": [
            {
                "version": 1,
                "state": "AVAILABLE",
                "reason": None,
                "runtime": "onnxruntime",
                "device": "cpu",
                "runtime_note": None,
            }
        ],
    }


def test_publishing_swaps_within_10_s_without_a_failed_request(
    http: httpx.Client, model_root: Path, colour_export: Path
) -> None:
    outcomes: list[tuple[float, int, int | None]] = []
    stop = threading.Event()

    def client_loop() -> None:
        with httpx.Client(base_url=str(http.base_url), timeout=60) as own:
            while not stop.is_set():
                response = _classify(own)
                version = response.json().get("version") if response.status_code == 200 else None
                outcomes.append((time.monotonic(), response.status_code, version))

    loop = threading.Thread(target=client_loop)
    loop.start()
    try:
        time.sleep(1.0)
        published_at = time.monotonic()
        assert ModelRepository(model_root).publish(colour_export, MODEL) == 2
        deadline = published_at + SWAP_DEADLINE_S
        while not any(v == 2 for _, _, v in outcomes) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)  # keep the load on after the swap
    finally:
        stop.set()
        loop.join()
    assert [o for o in outcomes if o[1] != 200] == [], "requests failed during the swap"
    first_v2 = min(t for t, _, v in outcomes if v == 2)
    assert first_v2 - published_at < SWAP_DEADLINE_S
    versions_in_order = [v for _, _, v in outcomes]
    assert versions_in_order == sorted(versions_in_order), "served versions went backwards"
    assert _model(http)["active_version"] == 2


def test_a_corrupted_version_stays_failed_and_the_old_one_serves(
    http: httpx.Client, model_root: Path
) -> None:
    _plant_corrupted_version(model_root / MODEL, source=2, version=3)
    deadline = time.monotonic() + SWAP_DEADLINE_S
    while (state := _version_state(_model(http), 3))["state"] != "FAILED":
        assert time.monotonic() < deadline, f"version 3 is {state}"
        time.sleep(0.2)
    assert "does not match its manifest" in state["reason"]
    # The public TF Serving status says FAILED, but the reason (server paths) needs the token.
    public = http.get(f"/v1/models/{MODEL}/versions/3").json()["model_version_status"][0]
    assert (public["state"], public["status"]["error_code"]) == ("END", "UNKNOWN")
    assert "GET /models" in public["status"]["error_message"]
    assert str(model_root) not in public["status"]["error_message"]
    assert _served_version(http) == 2
    assert _model(http)["active_version"] == 2
    metrics = http.get("/metrics").text
    assert f'graft_model_loads_total{{model="{MODEL}",outcome="failed"}} 1.0' in metrics


def test_pin_rolls_back_and_unpin_follows_the_newest_good_version(http: httpx.Client) -> None:
    response = http.put(f"/models/{MODEL}/policy", json={"pin": 1}, headers=ADMIN)
    assert response.status_code == 200, response.text
    assert (response.json()["name"], response.json()["pin"]) == (MODEL, 1)
    _wait_for_version(http, 1)
    assert _model(http)["pin"] == 1

    response = http.put(f"/models/{MODEL}/policy", json={"pin": None}, headers=ADMIN)
    assert response.status_code == 200, response.text
    _wait_for_version(http, 2)  # 3 is FAILED, so the newest good version
    assert _model(http)["pin"] is None


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [({"pin": 99}, 404, "not_found"), ({"pin": "x"}, 400, "bad_request"), ({}, 400, "bad_request")],
)
def test_bad_pins_are_refused(http: httpx.Client, body: dict, status: int, code: str) -> None:
    response = http.put(f"/models/{MODEL}/policy", json=body, headers=ADMIN)
    assert response.status_code == status, response.text
    assert response.json()["error"] == code
    assert _model(http)["pin"] is None


def test_push_publishes_a_checked_version_and_serves_it(
    http: httpx.Client, colour_export: Path
) -> None:
    response = http.post(
        f"/models/{MODEL}/versions",
        content=pack_export(colour_export),
        headers={**ADMIN, "content-type": "application/gzip"},
    )
    assert response.status_code == 201, response.text
    assert response.json() == {"name": MODEL, "version": 4}
    _wait_for_version(http, 4)


def test_a_bad_push_is_422_and_changes_nothing(http: httpx.Client) -> None:
    response = http.post(
        f"/models/{MODEL}/versions",
        content=b"not a tar.gz at all",
        headers={**ADMIN, "content-type": "application/gzip"},
    )
    assert response.status_code == 422, response.text
    assert response.json()["error"] == "rejected_model"
    assert [v["version"] for v in _model(http)["versions"]] == [1, 2, 3, 4]
    assert _served_version(http) == 4


def test_only_the_active_and_previous_versions_stay_loaded(http: httpx.Client) -> None:
    model = _model(http)
    assert (model["active_version"], model["previous_version"]) == (4, 2)
    states = {v["version"]: v["state"] for v in model["versions"]}
    assert states == {1: "UNLOADED", 2: "AVAILABLE", 3: "FAILED", 4: "AVAILABLE"}
    assert _classify(http, version=2).json()["version"] == 2
    response = _classify(http, version=1)
    assert response.status_code == 404, response.text
    assert "not loaded" in response.json()["message"]


def _version_state(model: dict, version: int) -> dict:
    return next((v for v in model["versions"] if v["version"] == version), {"state": "absent"})


def _plant_corrupted_version(model_dir: Path, *, source: int, version: int) -> None:
    """A complete-looking version whose weights no longer match their manifest hash."""
    staging = model_dir / f".corrupt-{version}"
    shutil.copytree(model_dir / str(source), staging)
    manifest = json.loads((staging / "graft.json").read_text())
    manifest["version"] = version
    (staging / "graft.json").write_text(json.dumps(manifest))
    weights = next((staging / "variables").glob("variables.data-*"))
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    staging.rename(model_dir / str(version))


def test_a_killed_inference_process_is_restarted_and_no_request_fails(
    server, http: httpx.Client
) -> None:
    """kill -9 the worker that holds the models: BentoML's supervisor restarts it, its socket's
    backlog is kept, and a request sent meanwhile waits for the new worker instead of failing."""
    victim = model_worker(server).pid
    os.kill(victim, signal.SIGKILL)
    # A new connection (the pooled one died with the worker, which in the default one-process
    # layout is also the HTTP worker): queued until the restarted worker has loaded the model.
    with httpx.Client(base_url=server.http, timeout=http.timeout) as fresh:
        response = _classify(fresh)
    assert response.status_code == 200, response.text
    assert response.json()["version"] == 4
    replacement = model_worker(server).pid
    assert replacement != victim
    deadline = time.monotonic() + 60
    while http.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, "never ready again"
        time.sleep(0.5)

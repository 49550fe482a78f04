"""A real `graft serve` in single-model mode (KServe) on loopback, with really trained models.

The served folder is MODEL_ROOT/colours, as KServe mounts `pvc://graft-models/colours` at
/mnt/models; the model is served as `leaves`, the InferenceService's name. New versions and the
pin arrive through the multi-model repository, as the retrain CronJob would publish them.
"""

import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from support.exports import make_tiny_export
from support.server import running_server
from support.trained import COLOURS, tinted_photo

from service.push.archive import pack_export
from service.store.repository import ModelRepository

pytestmark = pytest.mark.slow
NAME = "leaves"
SWAP_TIMEOUT_S = 120.0
TOKEN = "single-model-admin-token"
ENV = {"GRAFT_MODEL_NAME": NAME, "GRAFT_POLL_INTERVAL_S": "0.5", "GRAFT_ADMIN_TOKEN": TOKEN}
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


def _classify(http: httpx.Client, colour: str = "red", **fields: str) -> httpx.Response:
    files = [("images", ("photo.jpg", tinted_photo(colour), "image/jpeg"))]
    return http.post("/classify", files=files, data=fields)


def _until(check: Callable[[], bool], what: str, server) -> None:
    deadline = time.monotonic() + SWAP_TIMEOUT_S
    while not check():
        assert time.monotonic() < deadline, (
            f"{what} within {SWAP_TIMEOUT_S:.0f} s:\n{server.log_tail()}"
        )
        time.sleep(0.5)


def _active_version(http: httpx.Client) -> float | None:
    match = re.search(
        rf'^graft_model_active_version{{model="{NAME}"}} (\S+)$', http.get("/metrics").text, re.M
    )
    return float(match.group(1)) if match else None


def test_a_model_folder_is_served_under_its_name_and_hot_swaps(
    tmp_path: Path, colour_model_root: Path
) -> None:
    repository = ModelRepository(tmp_path / "models")
    shutil.copytree(colour_model_root, repository.root)  # colours v1
    mounted = repository.root / "colours"
    # No --default-model: the one model is the default, and /readyz waits for it.
    with (
        running_server(mounted, default_model=None, env=ENV) as server,
        httpx.Client(base_url=server.http, timeout=60) as http,
    ):
        for colour in COLOURS:
            body = _classify(http, colour).json()
            assert (body["model"], body["version"]) == (NAME, 1), body
            assert body["results"][0]["label"] == colour
        status = http.get(f"/v1/models/{NAME}").json()["model_version_status"]
        assert [(s["version"], s["state"]) for s in status] == [("1", "AVAILABLE")]
        unknown = _classify(http, model="colours")
        assert (unknown.status_code, unknown.json()["error"]) == (404, "not_found")
        assert _active_version(http) == 1

        # The retrain job publishes version 2 into the repository: picked up, no restart.
        export = make_tiny_export(tmp_path / "export", labels=("healthy", "scab"))
        assert repository.publish(export, "colours") == 2
        _until(lambda: _classify(http).json()["version"] == 2, "version 2 not served", server)
        assert _classify(http).json()["results"][0]["label"] in {"healthy", "scab"}
        assert _active_version(http) == 2

        # Roll back with the pin in the model's policy.json.
        repository.set_pin("colours", 1)
        _until(lambda: _classify(http).json()["version"] == 1, "the pin not followed", server)
        assert _classify(http, "blue").json()["results"][0]["label"] == "blue"
        assert http.get("/readyz").status_code == 200
        assert _active_version(http) == 1

        # The management API works on the served folder: a push lands in it as version 3,
        # and pins go to its policy.json.
        pushed = http.post(f"/models/{NAME}/versions", content=pack_export(export), headers=ADMIN)
        assert (pushed.status_code, pushed.json()) == (201, {"name": NAME, "version": 3})
        assert (mounted / "3" / "saved_model.pb").is_file()
        unpinned = http.put(f"/models/{NAME}/policy", json={"pin": None}, headers=ADMIN)
        assert unpinned.status_code == 200, unpinned.text
        assert repository.pin("colours") is None
        _until(lambda: _classify(http).json()["version"] == 3, "the pushed version", server)
        models = http.get("/models", headers=ADMIN).json()["models"]
        assert [(m["name"], m["active_version"]) for m in models] == [(NAME, 3)]


def test_one_versions_files_at_the_root_are_served_as_that_version(
    tmp_path: Path, colour_model_root: Path
) -> None:
    """KServe's storage initializer given a version's URI (.../colours/1) puts its files
    directly in /mnt/models: served read-only as the version its graft.json names."""
    mounted = tmp_path / "mnt-models"
    shutil.copytree(colour_model_root / "colours" / "1", mounted)
    before = sorted(path.relative_to(mounted) for path in mounted.rglob("*"))
    with (
        running_server(mounted, default_model=None, env=ENV) as server,
        httpx.Client(base_url=server.http, timeout=60) as http,
    ):
        body = _classify(http, "green").json()
        assert (body["model"], body["version"]) == (NAME, 1), body
        assert body["results"][0]["label"] == "green"
        assert _active_version(http) == 1
        export = make_tiny_export(tmp_path / "export", labels=("healthy", "scab"))
        pushed = http.post(f"/models/{NAME}/versions", content=pack_export(export), headers=ADMIN)
        assert pushed.status_code == 409, pushed.text
        assert pushed.json()["error"] == "read_only_repository"
        pinned = http.put(f"/models/{NAME}/policy", json={"pin": 1}, headers=ADMIN)
        assert (pinned.status_code, pinned.json()["error"]) == (409, "read_only_repository")
        assert http.get("/readyz").status_code == 200
    after = sorted(path.relative_to(mounted) for path in mounted.rglob("*"))
    assert after == before, "KServe mounts it read-only: nothing may be written there"

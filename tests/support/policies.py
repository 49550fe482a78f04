"""Canary and shadow tests' shared parts: a model `pets` with hand-built versions, the
management calls, and reading /metrics by labels.

    from support.policies import MODEL, publish, set_policy, model_status, until
"""

import time
from collections.abc import Callable
from pathlib import Path

import httpx

from support.exports import raw_saved_model
from support.images import encode, random_rgb
from support.server import RunningServer

MODEL = "pets"
LABELS = ["cat", "dog"]
TOKEN = "test-admin-token-0123456789"
ADMIN = {"authorization": f"Bearer {TOKEN}"}
ENV = {"GRAFT_ADMIN_TOKEN": TOKEN, "GRAFT_POLL_INTERVAL_S": "0.5"}
SMALL = encode(random_rgb(8, 8), "PNG")  # like the warm-up images: every version answers
LARGE = encode(random_rgb(200, 200), "PNG")  # over nan_for_large_images' 20 kB: NaN there


def publish(repository: object, folder: Path, outputs: Callable, *, candidate: bool) -> int:
    """A raw SavedModel (support.exports) published as the next version of MODEL; a candidate
    (as `graft train --promote gated` leaves a retrain) is not served by default."""
    from service.store.promotion import publish_candidate

    export = raw_saved_model(folder, LABELS, outputs)
    if candidate:
        return publish_candidate(repository, export, MODEL)  # type: ignore[arg-type]
    return repository.publish(export, MODEL)  # type: ignore[attr-defined]


def until(condition: Callable[[], object], what: str, server: RunningServer, timeout_s=60.0):
    """Poll `condition` until it is truthy; returns its value."""
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        assert time.monotonic() < deadline, f"{what} after {timeout_s:.0f} s:\n{server.log_tail()}"
        time.sleep(0.1)
    return value


def model_status(http: httpx.Client) -> dict:
    """MODEL's entry of GET /models."""
    response = http.get("/models", headers=ADMIN)
    assert response.status_code == 200, response.text
    return next(m for m in response.json()["models"] if m["name"] == MODEL)


def state(http: httpx.Client, version: int) -> str:
    return next(v["state"] for v in model_status(http)["versions"] if v["version"] == version)


def set_policy(http: httpx.Client, policy: object) -> httpx.Response:
    return http.put(f"/models/{MODEL}/policy", json=policy, headers=ADMIN)


def classify(http: httpx.Client, image: bytes = SMALL, key: str | None = None) -> httpx.Response:
    headers = {"x-graft-client": key} if key else {}
    files = [("images", ("a.png", image, "image/png"))]
    return http.post("/classify", files=files, headers=headers)


def metric(http: httpx.Client, name: str, **labels: str) -> float:
    """The sum of `name`'s series in /metrics that carry every label in `labels`."""
    wanted = [f'{key}="{value}"' for key, value in labels.items()]
    total = 0.0
    for line in http.get("/metrics").text.splitlines():
        series, _, value = line.rpartition(" ")
        if series.split("{")[0] == name and all(label in series for label in wanted):
            total += float(value)
    return total

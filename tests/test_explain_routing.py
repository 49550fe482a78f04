"""`POST /explain` takes /classify's version choice and policy on a real `graft serve`: the
sticky X-Graft-Client key of a canary, `reject_unknown` asked by the request or by the model's
policy, and the clear 400 for a version without the out-of-distribution flag.

Tiny real exports (support/exports.py), each with the `explain` signature: the flagged model
(support/policies.py's MODEL) v1 (the stable version) and v2 (a candidate, served as a 50 %
canary), both with the flag, and `old` exported without the flag. The tests share one server
and run in file order.
"""

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from support.exports import generated_images, make_tiny_export
from support.images import encode
from support.policies import ENV, MODEL, set_policy, state, until
from support.server import RunningServer, running_server

from service.store.promotion import publish_candidate
from service.store.repository import ModelRepository

pytestmark = pytest.mark.slow
FLAGGED, OLD = MODEL, "old"
CANARY = {"version": 2, "percent": 50, "window_s": 3600}
SIZE = 32


def _white() -> bytes:
    """An image unlike the tiny training set: flagged out of distribution."""
    return encode(np.full((SIZE, SIZE, 3), 255, np.uint8), "PNG")


def _leaf_like() -> bytes:
    """An image drawn like the tiny training set: in distribution."""
    images, _ = generated_images(1, 3, SIZE, seed=7)
    return encode(np.clip(images[0], 0, 255).astype(np.uint8), "PNG")


@pytest.fixture(scope="module")
def model_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    scratch = tmp_path_factory.mktemp("explain-routing")
    repository = ModelRepository(scratch / "models")
    repository.publish(make_tiny_export(scratch / "v1", ood=True), FLAGGED)
    publish_candidate(repository, make_tiny_export(scratch / "v2", ood=True), FLAGGED)
    repository.publish(make_tiny_export(scratch / "old"), OLD)
    return repository.root


@pytest.fixture(scope="module")
def server(model_root: Path) -> Iterator[RunningServer]:
    with running_server(model_root, default_model=FLAGGED, env=ENV) as running:
        yield running


@pytest.fixture(scope="module")
def http(server: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.http, timeout=60) as client:
        yield client


def _post(
    http: httpx.Client, route: str, images: list[bytes], key: str | None = None, **fields: str
) -> httpx.Response:
    files = [("images", (f"image{i}.png", data, "image/png")) for i, data in enumerate(images)]
    headers = {"x-graft-client": key} if key else {}
    return http.post(route, files=files, data=fields, headers=headers)


def _set_policy(http: httpx.Client, policy: dict) -> None:
    answer = set_policy(http, policy)
    assert answer.status_code == 200, answer.text


def test_a_client_key_lands_explain_on_the_version_classify_gives_it(
    http: httpx.Client, server: RunningServer
) -> None:
    _set_policy(http, {"canary": CANARY})
    until(lambda: state(http, 2) == "AVAILABLE", "the canary never loaded", server)
    on: dict[str, set[int]] = {}
    for index in range(16):
        key = f"client-{index}"
        classified = _post(http, "/classify", [_leaf_like()], key)
        assert classified.status_code == 200, classified.text
        explained = [_post(http, "/explain", [_leaf_like()], key) for _ in range(3)]
        assert all(e.status_code == 200 for e in explained), [e.text for e in explained]
        on[key] = {e.json()["version"] for e in explained}
        assert on[key] == {classified.json()["version"]}, key
    assert {version for versions in on.values() for version in versions} == {1, 2}, (
        "keys must hash to both sides of a 50 % canary"
    )


def test_explain_honours_reject_unknown_from_the_request(http: httpx.Client) -> None:
    images = [_leaf_like(), _white()]
    plain = _post(http, "/explain", images)
    assert plain.status_code == 200, plain.text
    explanations = plain.json()["explanations"]
    assert [e["in_distribution"] for e in explanations] == [True, False]
    assert explanations[1]["label"] != "unknown"  # flagged, but nobody asked to reject it
    rejecting = _post(http, "/explain", images, reject_unknown="true")
    assert rejecting.status_code == 200, rejecting.text
    rejected = rejecting.json()["explanations"]
    assert [e["label"] for e in rejected] == [explanations[0]["label"], "unknown"]
    assert rejected[1]["heatmap_png"]  # still explained: the heatmap of the top-1 class


def test_explain_honours_the_models_reject_unknown_policy(
    http: httpx.Client, server: RunningServer
) -> None:
    _set_policy(http, {"canary": CANARY, "reject_unknown": True})

    def by_policy() -> bool:
        answer = _post(http, "/explain", [_white()])
        assert answer.status_code == 200, answer.text
        return answer.json()["explanations"][0]["label"] == "unknown"

    until(by_policy, "explain never followed the policy's reject_unknown", server)
    asked_not = _post(http, "/explain", [_white()], reject_unknown="false")
    assert asked_not.json()["explanations"][0]["label"] != "unknown"
    _set_policy(http, {"canary": CANARY})


def test_reject_unknown_on_a_version_without_the_flag_is_a_clear_400(http: httpx.Client) -> None:
    refused = _post(http, "/explain", [_white()], model=OLD, reject_unknown="true")
    assert refused.status_code == 400, refused.text
    message = refused.json()["message"]
    assert "reject_unknown" in message and "no out-of-distribution flag" in message
    assert _post(http, "/explain", [_white()], model=OLD).status_code == 200  # served as before

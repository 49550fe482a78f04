"""Canary traffic on a real `graft serve`: the split, sticky clients on every protocol, bad
policies, and the automatic withdrawal and promotion of a canary.

Real SavedModels built by hand (tests/support/exports.py): the stable version answers every
image; the canary candidate passes its warm-up (small images) and answers NaN on large ones,
as a retrain that broke at run time would. The tests in each section share one server and run
in file order.
"""

import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from support.exports import constant_outputs, nan_for_large_images
from support.policies import (
    ADMIN,
    ENV,
    LARGE,
    MODEL,
    SMALL,
    classify,
    metric,
    model_status,
    publish,
    set_policy,
    state,
    until,
)
from support.server import RunningServer, running_server

from service.store.promotion import read_promotions
from service.store.repository import ModelRepository
from service.stubs.graft.v1 import classifier_pb2 as pb
from service.stubs.graft.v1 import classifier_pb2_grpc as pb_grpc
from service.wire import PromotionState

pytestmark = pytest.mark.slow
STABLE_ROW = (0.7, 0.3)


# -- the split -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def split_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    scratch = tmp_path_factory.mktemp("canary-split")
    repository = ModelRepository(scratch / "models")
    publish(repository, scratch / "v1", constant_outputs(STABLE_ROW), candidate=False)
    publish(repository, scratch / "v2", constant_outputs(STABLE_ROW), candidate=True)
    broken = publish(repository, scratch / "v3", constant_outputs(STABLE_ROW), candidate=False)
    # v3 no longer matches its manifest: FAILED at load, so v1 stays the stable version
    with (repository.version_dir(MODEL, broken) / "assets" / "labels.txt").open("a") as labels:
        labels.write("tampered\n")
    return repository.root


@pytest.fixture(scope="module")
def split_server(split_root: Path) -> Iterator[RunningServer]:
    with running_server(split_root, default_model=MODEL, grpc=True, env=ENV) as running:
        yield running


@pytest.fixture(scope="module")
def http(split_server: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=split_server.http, timeout=60) as client:
        yield client


def test_a_canary_at_20_percent_gets_exactly_a_fifth_of_500_requests(
    http: httpx.Client, split_server: RunningServer
) -> None:
    assert model_status(http)["active_version"] == 1, (
        "the candidate v2 must not be served by default"
    )
    answer = set_policy(http, {"canary": {"version": 2, "percent": 20, "window_s": 3600}})
    assert answer.status_code == 200, answer.text
    assert answer.json()["canary"]["version"] == 2 and answer.json()["canary_since"] > 0
    until(lambda: state(http, 2) == "AVAILABLE", "the canary never loaded", split_server)
    versions = []
    for _ in range(500):
        response = classify(http)
        assert response.status_code == 200, response.text
        versions.append(response.json()["version"])
    share = versions.count(2) / len(versions)
    assert abs(share - 0.20) <= 0.05
    assert versions.count(2) == 100, "the split of requests without a key is exact"
    assert set(versions) == {1, 2}
    assert metric(http, "graft_split_requests_total", arm="canary", version="2") == 100
    assert metric(http, "graft_split_requests_total", arm="stable", version="1") == 400
    figures = model_status(http)["traffic"]["canary"]
    assert (figures["version"], figures["requests"], figures["errors"]) == (2, 100, 0)
    assert figures["mean_confidence"] == pytest.approx(0.7)
    assert model_status(http)["active_version"] == 1


def test_a_client_key_always_lands_on_the_same_version_on_every_protocol(
    http: httpx.Client, split_server: RunningServer
) -> None:
    landed: dict[str, set[int]] = {}
    for index in range(60):
        key = f"client-{index}"
        landed[key] = {classify(http, key=key).json()["version"] for _ in range(3)}
    assert all(len(versions) == 1 for versions in landed.values()), landed
    on_canary = {key for key, versions in landed.items() if versions == {2}}
    assert 0 < len(on_canary) < len(landed), "keys must hash to both sides of a 20 % split"
    # The split is a pure function of the key: gRPC metadata and the V2 header agree with HTTP.
    with grpc.insecure_channel(split_server.grpc_target or "") as channel:
        stub = pb_grpc.ImageClassifierStub(channel)
        for key, versions in landed.items():
            request = pb.ClassifyRequest(images=[SMALL])
            answer = stub.Classify(request, metadata=(("x-graft-client", key),), timeout=60)
            assert {answer.version} == versions, key
    image = base64.b64encode(SMALL).decode()
    v2_body = {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1], "data": [image]}]}
    for key in list(landed)[:10]:
        headers = {"x-graft-client": key}
        response = http.post(f"/v2/models/{MODEL}/infer", json=v2_body, headers=headers)
        assert response.status_code == 200, response.text
        assert {int(response.json()["model_version"])} == landed[key], key


BAD_POLICIES = {  # case -> (policy, the field the 400 must name)
    "missing canary version": ({"canary": {"version": 9, "percent": 10}}, "canary.version"),
    "percent over 100": ({"canary": {"version": 2, "percent": 100.5}}, "canary.percent"),
    "negative percent": ({"canary": {"version": 2, "percent": -1}}, "canary.percent"),
    "canary is the stable": ({"canary": {"version": 1, "percent": 10}}, "canary.version"),
    "pinned canary": ({"pin": 1, "canary": {"version": 1, "percent": 10}}, "canary.version"),
    "shadow of a FAILED version": ({"shadow": {"version": 3, "rate": 0.5}}, "shadow.version"),
    "missing shadow version": ({"shadow": {"version": 7, "rate": 0.5}}, "shadow.version"),
    "shadow is the stable": ({"shadow": {"version": 1, "rate": 0.5}}, "shadow.version"),
    "canary of a FAILED version": ({"canary": {"version": 3, "percent": 5}}, "canary.version"),
    "zero shadow rate": ({"shadow": {"version": 2, "rate": 0}}, "shadow.rate"),
    "unknown field": ({"canary": {"version": 2, "percent": 5, "colour": 1}}, "canary.colour"),
    "unknown top field": ({"pinn": 1}, "pinn"),
    "version as text": ({"canary": {"version": "2", "percent": 5}}, "canary.version"),
    "percent as text": ({"canary": {"version": 2, "percent": "5"}}, "canary.percent"),
    "rate as bool": ({"shadow": {"version": 2, "rate": True}}, "shadow.rate"),
    "window of zero": ({"canary": {"version": 2, "percent": 5, "window_s": 0}}, "window_s"),
    "flag as text": ({"reject_unknown": "yes"}, "reject_unknown"),
    "server field": ({"canary_since": 1.0}, "canary_since"),
    "empty policy": ({}, "policy"),
    "not an object": ([1], "policy"),
}


@pytest.mark.parametrize("case", sorted(BAD_POLICIES))
def test_a_bad_policy_is_a_400_naming_the_field_and_changes_nothing(
    http: httpx.Client, split_root: Path, case: str
) -> None:
    policy, field = BAD_POLICIES[case]
    before = (split_root / MODEL / "policy.json").read_bytes()
    response = set_policy(http, policy)
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "bad_request"
    assert field in response.json()["message"], response.json()
    assert (split_root / MODEL / "policy.json").read_bytes() == before
    assert model_status(http)["policy"]["canary"]["version"] == 2
    assert http.get("/livez").status_code == 200
    assert http.get("/readyz").status_code == 200


def test_a_pin_of_a_missing_version_is_still_404_and_a_missing_model_too(
    http: httpx.Client,
) -> None:
    assert set_policy(http, {"pin": 99}).status_code == 404
    missing = http.put("/models/ghost/policy", json={"pin": None}, headers=ADMIN)
    assert missing.status_code == 404, missing.text
    assert model_status(http)["policy"]["canary"]["version"] == 2


# -- withdrawal and promotion ----------------------------------------------------------------


@pytest.fixture(scope="module")
def judged_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    scratch = tmp_path_factory.mktemp("canary-judged")
    repository = ModelRepository(scratch / "models")
    publish(repository, scratch / "v1", constant_outputs(STABLE_ROW), candidate=False)
    publish(repository, scratch / "v2", nan_for_large_images, candidate=True)
    publish(repository, scratch / "v3", constant_outputs(STABLE_ROW), candidate=True)
    return repository.root


@pytest.fixture(scope="module")
def judged_server(judged_root: Path) -> Iterator[RunningServer]:
    with running_server(judged_root, default_model=MODEL, grpc=True, env=ENV) as running:
        yield running


@pytest.fixture(scope="module")
def judged(judged_server: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=judged_server.http, timeout=60) as client:
        yield client


def test_a_canary_that_fails_real_images_is_withdrawn_and_no_request_fails(
    judged: httpx.Client, judged_server: RunningServer, judged_root: Path
) -> None:
    canary = {"version": 2, "percent": 50, "min_requests": 4, "max_error_rate": 0.25}
    assert set_policy(judged, {"canary": canary}).status_code == 200
    until(lambda: state(judged, 2) == "AVAILABLE", "the canary never loaded", judged_server)
    started = time.monotonic()
    answers = [classify(judged, LARGE) for _ in range(40)]
    assert [a.status_code for a in answers] == [200] * 40, [a.text for a in answers if a.is_error]
    assert {a.json()["version"] for a in answers} == {1}, "every answer comes from the stable"
    # Every other request went to the canary until its 4th failure: 4 retried on the stable.
    assert metric(judged, "graft_canary_retries_total", model=MODEL, version="2") == 4
    policy_file = judged_root / MODEL / "policy.json"
    until(lambda: "canary" not in json.loads(policy_file.read_text()), "not withdrawn",
           judged_server)  # fmt: skip
    policy = json.loads(policy_file.read_text())
    decision = policy["decisions"][-1]
    assert (decision["version"], decision["decision"]) == (2, "withdrawn")
    assert "error rate 1.000 over the last 4 canary requests" in decision["reason"]
    assert time.monotonic() - started < 60, "withdrawn within the policy's window"
    shown = until(lambda: model_status(judged)["policy"]["decisions"], "no decision", judged_server)
    assert shown[-1]["reason"] == decision["reason"]
    withdrawn = {"decision": "withdrawn", "model": MODEL, "version": "2"}
    until(lambda: metric(judged, "graft_canary_decisions_total", **withdrawn) == 1,
           "the withdrawal not counted", judged_server)  # fmt: skip
    assert model_status(judged)["active_version"] == 1, "a withdrawn canary never becomes stable"
    assert judged.get("/readyz").status_code == 200


def test_a_canary_that_holds_is_promoted_and_becomes_the_stable_version(
    judged: httpx.Client, judged_server: RunningServer, judged_root: Path
) -> None:
    canary = {"version": 3, "percent": 50, "min_requests": 3, "auto_promote_after_s": 1}
    assert set_policy(judged, {"canary": canary}).status_code == 200
    until(lambda: state(judged, 3) == "AVAILABLE", "the canary never loaded", judged_server)
    policy_file = judged_root / MODEL / "policy.json"

    def promoted() -> bool:
        response = classify(judged)
        assert response.status_code == 200, response.text
        return "canary" not in json.loads(policy_file.read_text())

    until(promoted, "the canary was never promoted", judged_server)
    policy = json.loads(policy_file.read_text())
    assert (policy["decisions"][-1]["version"], policy["decisions"][-1]["decision"]) == (
        3,
        "promoted",
    )
    record = read_promotions(ModelRepository(judged_root), MODEL)[3]
    assert (record.state, record.decided_by) == (PromotionState.PROMOTED, "auto")
    assert "canary promoted automatically" in record.reason
    until(lambda: classify(judged).json()["version"] == 3, "v3 not stable", judged_server)
    assert model_status(judged)["active_version"] == 3

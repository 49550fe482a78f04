"""Shadow traffic on a real `graft serve`: a candidate that breaks on real images is run beside
the stable version on every request, and no caller ever sees it; shadow images never share an
inference batch with callers' images (the batcher's background lane: tests/test_batcher.py
holds its order); under overload (a paused inference worker holding the callers' requests)
shadow samples are dropped first, counted, and never take a caller's place. Agreement and
both mean confidences are in GET /models and /metrics. The tests share one server and run in
file order.
"""

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from support.exports import constant_outputs, nan_for_large_images
from support.policies import (
    ENV,
    LARGE,
    MODEL,
    SMALL,
    metric,
    model_status,
    publish,
    set_policy,
    state,
    until,
)
from support.server import (
    RunningServer,
    images_in_flight,
    paused_inference,
    running_server,
    wait_for_images_in_flight,
)

from service.store.repository import ModelRepository

pytestmark = pytest.mark.slow
QUEUE = 3  # GRAFT_SHADOW_QUEUE: images of samples waiting
BURST = 8  # callers held at once by the paused worker


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    scratch = tmp_path_factory.mktemp("shadow")
    repository = ModelRepository(scratch / "models")
    publish(repository, scratch / "v1", constant_outputs((0.7, 0.3)), candidate=False)
    publish(repository, scratch / "v2", nan_for_large_images, candidate=True)
    env = {**ENV, "GRAFT_SHADOW_QUEUE": str(QUEUE)}
    with running_server(
        repository.root, default_model=MODEL, separate_inference=True, env=env
    ) as running:
        yield running


@pytest.fixture(scope="module")
def http(server: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.http, timeout=60) as client:
        yield client


def _post(server: RunningServer, image: bytes) -> httpx.Response:
    files = [("images", ("a.png", image, "image/png"))]
    return httpx.post(f"{server.http}/classify", files=files, timeout=60)


def _shadow(http: httpx.Client) -> dict:
    return model_status(http)["traffic"]["shadow"]


def _settled(http: httpx.Client, count: int) -> dict | None:
    """The shadow figures once `count` samples are accounted for (None before)."""
    figures = _shadow(http)
    return figures if _accounted(figures) == count else None


def _shadow_batches(http: httpx.Client) -> dict[str, float]:
    """graft_inference_batches_total of the batches that held shadow images, by protocols:
    "shadow" alone, or mixed with callers' ("http+shadow")."""
    found = {}
    for line in http.get("/metrics").text.splitlines():
        series, _, value = line.rpartition(" ")
        if series.startswith("graft_inference_batches_total{") and "shadow" in series:
            found[series.split('protocols="')[1].split('"')[0]] = float(value)
    return found


def _accounted(figures: dict) -> int:
    """Shadow samples (of one image each here) whose fate is known."""
    return figures["compared"] + figures["errors"] + sum(figures["dropped"].values())


def test_a_broken_shadow_never_adds_an_error_and_is_compared_on_every_request(
    http: httpx.Client, server: RunningServer
) -> None:
    answer = set_policy(http, {"shadow": {"version": 2, "rate": 1}})
    assert answer.status_code == 200, answer.text
    until(lambda: state(http, 2) == "AVAILABLE", "the shadow never loaded", server)
    answers = [_post(server, image) for image in [LARGE, SMALL] * 10]
    assert [a.status_code for a in answers] == [200] * 20, [a.text for a in answers if a.is_error]
    assert {a.json()["version"] for a in answers} == {1}
    assert [a.json()["results"][0]["score"] for a in answers] == [pytest.approx(0.7)] * 20
    figures = until(lambda: _settled(http, 20), "shadow samples unaccounted", server)
    assert (figures["version"], figures["compared"], figures["errors"]) == (2, 10, 10)
    assert figures["dropped"] == {}
    assert figures["agreement"] == 1.0  # [0.5, 0.5] is "cat", as the stable's [0.7, 0.3]
    assert figures["mean_confidence"] == pytest.approx(0.5)
    assert figures["stable_mean_confidence"] == pytest.approx(0.7)
    assert metric(http, "graft_shadow_comparisons_total", outcome="agree", version="2") == 10
    assert metric(http, "graft_shadow_comparisons_total", outcome="error", version="2") == 10
    shadow_sum = metric(http, "graft_shadow_confidence_sum", role="shadow", version="2")
    assert shadow_sum == pytest.approx(5.0)
    # Each sample in a batch of its own, even when the next caller's image came at once.
    assert _shadow_batches(http) == {"shadow": 20}
    assert http.get("/readyz").status_code == 200


def test_under_overload_shadow_samples_are_dropped_first_and_callers_keep_their_places(
    http: httpx.Client, server: RunningServer
) -> None:
    before = _shadow(http)
    with ThreadPoolExecutor(BURST) as pool:  # outside: its exit waits for the calls
        with paused_inference(server):
            calls = [pool.submit(_post, server, SMALL) for _ in range(BURST)]
            wait_for_images_in_flight(server, BURST)
            # Every caller was admitted; the samples beyond the shadow queue were dropped at
            # once, while the callers were still held: shadow work never waited for a place.
            assert images_in_flight(server) == BURST
            dropped = metric(http, "graft_shadow_dropped_total", reason="queue_full")
            assert dropped == BURST - QUEUE
        answers = [call.result() for call in calls]
    assert [a.status_code for a in answers] == [200] * BURST, [a.text for a in answers]
    assert {a.json()["version"] for a in answers} == {1}
    settled = _accounted(before) + BURST
    after = until(lambda: _settled(http, settled), "shadow samples unaccounted", server)
    assert after["dropped"]["queue_full"] == BURST - QUEUE
    ran = after["compared"] - before["compared"]
    assert ran == QUEUE, after  # the queued samples waited for the callers' batch, then ran
    assert "busy" not in after["dropped"], after
    assert after["errors"] == before["errors"], "small images: the shadow answers them all"
    assert set(_shadow_batches(http)) == {"shadow"}, "shadow images shared a caller's batch"
    assert http.get("/readyz").status_code == 200


def test_dropping_the_shadow_from_the_policy_stops_it(http: httpx.Client, server: RunningServer):
    assert set_policy(http, {"pin": None}).status_code == 200
    until(lambda: state(http, 2) == "UNLOADED", "the shadow stayed loaded", server)
    assert _post(server, SMALL).status_code == 200
    assert model_status(http)["traffic"] is None

"""The two layouts of `graft serve`, and what a request that kills the model process costs.

GRAFT_WORKERS=1 (the default): one BentoML worker serves HTTP and gRPC and owns the models.
GRAFT_WORKERS>1: entry workers without TensorFlow call one inference worker over a socket.

The poison model is a real SavedModel (of allowed ops only) that spins for ever on any image
over 20 KB; its warm-up images are smaller. While a worker spins on one, the test kills it
with SIGKILL, as a crash or the OOM killer would. Each time the request is delivered again,
the new worker's batch counter moves and it is killed again. A request that takes its worker
down must not be replayed into every restarted inference worker.
"""

import gc
import io
import os
import re
import subprocess
import sys
import time
import weakref
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from PIL import Image
from support.exports import raw_saved_model
from support.server import (
    RunningServer,
    bentoml_workers,
    model_worker,
    paused_inference,
    running_server,
    wait_for_images_in_flight,
)

from service.app.heap import FrozenHeap
from service.store.repository import ModelRepository
from service.stubs.graft.v1 import classifier_pb2 as pb
from service.stubs.graft.v1 import classifier_pb2_grpc as pb_grpc
from service.wire import ModelStatus, VersionState, VersionStatus

POISON_BYTES = 20_000
READY_TIMEOUT_S = 180


def _spins_on_large_images(images: object) -> object:
    import tensorflow as tf

    large = tf.reduce_max(tf.strings.length(images)) > POISON_BYTES
    spins = tf.while_loop(lambda i: large, lambda i: i + 1, [tf.constant(0)])[0]
    return tf.fill([tf.shape(images)[0], 2], 0.5) + tf.cast(spins * 0, tf.float32)


@pytest.fixture(scope="module")
def model_root(tmp_path_factory: pytest.TempPathFactory, colour_export: Path) -> Path:
    root = tmp_path_factory.mktemp("layouts") / "models"
    repository = ModelRepository(root)
    repository.publish(colour_export, "colours")
    export = tmp_path_factory.mktemp("poison") / "export"
    repository.publish(raw_saved_model(export, ["a", "b"], _spins_on_large_images), "poison")
    return root


@pytest.fixture(scope="module")
def one_process(model_root: Path) -> Iterator[RunningServer]:
    with running_server(model_root, default_model="colours", grpc=True) as server:
        yield server


@pytest.fixture(scope="module")
def two_process(model_root: Path) -> Iterator[RunningServer]:
    # The poison request's deadline must outlast two restarts of the inference worker; the
    # access log is on here, off in `one_process` (the default).
    env = {"GRAFT_REQUEST_TIMEOUT_S": "600", "GRAFT_ACCESS_LOG": "true"}
    with running_server(model_root, default_model="colours", workers=2, env=env) as server:
        yield server


def red() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (220, 20, 20)).save(buffer, "PNG")
    return buffer.getvalue()


def poison_image() -> bytes:
    """A valid PNG over POISON_BYTES: noise does not compress."""
    pixels = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    assert len(buffer.getvalue()) > POISON_BYTES
    return buffer.getvalue()


def classify(server: RunningServer, image: bytes, model: str = "colours") -> httpx.Response:
    files = [("images", ("image.png", image, "image/png"))]
    url = f"{server.http}/classify"
    return httpx.post(url, files=files, data={"model": model}, timeout=120)


def starts(server: RunningServer, service: str) -> int:
    """How many times a worker of `service` has started, from the server's log."""
    pattern = re.compile(rf"\] Service {re.escape(service)} initialized$", re.MULTILINE)
    return len(pattern.findall(server.log.read_text(errors="replace")))


def batches_started(server: RunningServer) -> float:
    """Inference batches started so far, over every worker that ever ran (a killed worker's
    counts stay in the multiprocess folder): a poison request's delivery moves it by one."""
    text = httpx.get(f"{server.http}/metrics", timeout=30).text
    lines = [line for line in text.splitlines() if line.startswith("graft_inference_batches_total")]
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines)


def kill_when_delivered(
    server: RunningServer, batches: float, unless_done: Future | None = None
) -> int | None:
    """Once `batches` inference batches have started (the poison request spins in the model
    worker), SIGKILL that worker; returns its pid, or None if `unless_done` ended first."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while batches_started(server) < batches:
        if unless_done is not None and unless_done.done():
            return None
        assert time.monotonic() < deadline, f"never delivered:\n{server.log_tail()}"
        time.sleep(0.1)
    assert batches_started(server) == batches, "delivered more often than expected"
    victim = model_worker(server)
    victim.kill()
    victim.wait(30)
    return victim.pid


def wait_until_serving(server: RunningServer) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        try:
            ready = httpx.get(f"{server.http}/readyz", timeout=5).status_code == 200
            if ready and classify(server, red()).status_code == 200:
                return
        except httpx.HTTPError:
            pass  # the worker is restarting
        assert time.monotonic() < deadline, f"never serving again:\n{server.log_tail()}"
        time.sleep(0.5)


# -- one process --------------------------------------------------------------------------------


def test_one_worker_serves_http_and_grpc_and_owns_the_models(one_process: RunningServer) -> None:
    assert bentoml_workers(one_process, "graft-inference") == []
    (worker,) = bentoml_workers(one_process, "graft")
    assert model_worker(one_process).pid == worker.pid
    answer = classify(one_process, red())
    assert answer.status_code == 200, answer.text
    assert answer.json()["results"][0]["label"] == "red"
    with grpc.insecure_channel(one_process.grpc_target or "") as channel:
        reply = pb_grpc.ImageClassifierStub(channel).Classify(
            pb.ClassifyRequest(images=[red()]), timeout=60
        )
    assert reply.results[0].label == "red"
    assert reply.results[0].score == pytest.approx(answer.json()["results"][0]["score"], abs=1e-6)
    metrics = httpx.get(f"{one_process.http}/metrics", timeout=30).text
    # The batcher's metrics and the gateway's come from the same process and the same /metrics.
    assert re.search(r'^graft_inference_batches_total\{protocols="grpc"\} [1-9]', metrics, re.M)
    assert re.search(r'^graft_inference_batches_total\{protocols="http"\} [1-9]', metrics, re.M)
    assert 'graft_request_duration_seconds_count{code="OK"' in metrics
    assert httpx.get(f"{one_process.http}/livez", timeout=10).status_code == 200


def test_a_worker_killed_mid_request_in_one_process_is_restarted(
    one_process: RunningServer,
) -> None:
    """The worker dies under the request, so its client's connection breaks (nothing is left to
    answer it); BentoML restarts the worker, which serves again. Nothing replays the request."""
    before = starts(one_process, "graft")
    delivered = batches_started(one_process)
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(classify, one_process, poison_image(), "poison")
        victim = kill_when_delivered(one_process, delivered + 1)
        with pytest.raises(httpx.TransportError):
            answer.result(timeout=60)
    wait_until_serving(one_process)
    assert model_worker(one_process).pid != victim
    assert starts(one_process, "graft") == before + 1, one_process.log_tail()


# -- two processes ------------------------------------------------------------------------------


def test_two_process_layout_has_a_separate_model_worker(two_process: RunningServer) -> None:
    assert len(bentoml_workers(two_process, "graft")) == 2
    (inference,) = bentoml_workers(two_process, "graft-inference")
    assert model_worker(two_process).pid == inference.pid
    # The entry workers stay light: TensorFlow is loaded in the inference worker only.
    for entry in bentoml_workers(two_process, "graft"):
        libraries = {Path(m.path).name for m in entry.memory_maps()}
        assert not any("tensorflow" in name for name in libraries), entry.pid
    assert any("tensorflow" in Path(m.path).name for m in inference.memory_maps())
    with ThreadPoolExecutor(1) as pool:
        with paused_inference(two_process):
            held = pool.submit(classify, two_process, red())
            wait_for_images_in_flight(two_process, 1)
        assert held.result(timeout=120).status_code == 200


def test_a_request_that_kills_the_inference_process_is_sent_at_most_twice(
    two_process: RunningServer,
) -> None:
    """Killed under the request, the inference worker is restarted and the entry sends the
    request once more; killed under it again, the entry gives up at once (it used to replay it
    8 times, into each restarted worker)."""
    delivered = batches_started(two_process)
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(classify, two_process, poison_image(), "poison")
        first = kill_when_delivered(two_process, delivered + 1)
        # The entry may send it once more, into the restarted worker: kill that one too. (On a
        # slow machine the replay can also fail to connect in time; either way it is answered.)
        second = kill_when_delivered(two_process, delivered + 2, unless_done=answer)
        response = answer.result(timeout=60)  # at once: no third delivery to wait for
    assert second is None or first != second
    assert response.status_code == 500, response.text
    if second is not None:
        assert "not sent again" in response.json()["message"]
    assert batches_started(two_process) <= delivered + 2  # never a third delivery
    wait_until_serving(two_process)


# -- the access log, the frozen heap ----------------------------------------------------------

ACCESS_LINE = re.compile(r"\(scheme=http,method=POST,path=/classify[^)]*\) \(status=200")


@pytest.mark.parametrize(("layout", "logged"), [("one_process", False), ("two_process", True)])
def test_the_access_log_is_written_only_when_asked_for(
    request: pytest.FixtureRequest, layout: str, logged: bool
) -> None:
    server: RunningServer = request.getfixturevalue(layout)
    assert classify(server, red()).status_code == 200
    # The line is written after the answer is sent. One worker serves one_process: once a
    # later request is answered, its event loop is past that point.
    assert httpx.get(f"{server.http}/livez", timeout=30).status_code == 200
    deadline = time.monotonic() + (30 if logged else 0)
    while not ACCESS_LINE.search(server.log.read_text(errors="replace")):
        if time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    assert bool(ACCESS_LINE.search(server.log.read_text(errors="replace"))) is logged


class _Version:
    """Stands for a loaded version's objects: tracked by the collector, can hold a cycle."""

    me: object = None


def _frozen(thing: object) -> bool:
    return not any(o is thing for o in gc.get_objects())


def _available(*versions: int) -> list[ModelStatus]:
    states = [VersionStatus(version=v, state=VersionState.AVAILABLE) for v in versions]
    return [ModelStatus(name="m", active_version=max(versions), previous_version=None,
                        pin=None, versions=states)]  # fmt: skip


def test_the_heap_is_frozen_with_the_loaded_versions_and_refrozen_when_they_change() -> None:
    """A generation-2 collection walks what is not frozen; an unloaded version's cycles must
    still be collected, or a hot swap would keep its memory for ever."""
    heap = FrozenHeap()
    gc.disable()  # only the heap's own collections run, so they can be counted
    try:
        heap.track([])  # still loading: nothing to freeze yet
        first = _Version()
        first.me = first  # a cycle: only the collector frees it
        unloaded = weakref.ref(first)
        heap.track(_available(1))
        assert _frozen(first)
        del first
        later = _Version()
        heap.track(_available(1))  # the same versions: nothing collected or frozen again
        assert not _frozen(later) and unloaded() is not None
        garbage = _Version()
        garbage.me = garbage  # a cycle made since the freeze, and dropped
        dropped = weakref.ref(garbage)
        del garbage
        full = gc.get_stats()[2]["collections"]
        heap.track(_available(1, 2))  # version 2 joins, 1 is kept: frozen, no full collection
        assert gc.get_stats()[2]["collections"] == full
        assert _frozen(later) and unloaded() is not None
        assert dropped() is None, "garbage was frozen for ever with the new version"
        heap.track(_available(2))  # version 1 unloaded: collected, the rest frozen again
        assert gc.get_stats()[2]["collections"] == full + 1
        assert unloaded() is None, "the unloaded version's cycle was kept"
        assert _frozen(later)
    finally:
        gc.unfreeze()
        gc.enable()


# -- BentoML's tracing ------------------------------------------------------------------------

_TRACED_URLS = """
from _bentoml_impl.loader import load

app = load("service.app.entry:Graft", standalone_load=True).to_asgi(is_main=True)
(otel,) = [m for m in app.user_middleware if m.cls.__name__ == "OpenTelemetryMiddleware"]
excluded = otel.kwargs["excluded_urls"]
print(bool(excluded) and excluded.url_disabled("http://127.0.0.1:8000/classify"))
"""


@pytest.mark.parametrize(
    ("options", "untraced"),
    [(None, "True"), ("api_server.workers=1", "True"), ("tracing.sample_rate=1.0", "False")],
)
def test_the_served_app_makes_no_spans_unless_tracing_is_configured(
    tmp_path: Path, options: str | None, untraced: str
) -> None:
    """The OpenTelemetry middleware of the app a BentoML worker builds skips every URL (BentoML
    1.4 drops a global `tracing.excluded_urls`: the service's own config must carry it)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BENTOML_CONFIG")}
    env |= {"GRAFT_MODEL_ROOT": str(tmp_path), "BENTOML_HOME": str(tmp_path / "bentoml")}
    if options is not None:
        env["BENTOML_CONFIG_OPTIONS"] = options
    done = subprocess.run(
        [sys.executable, "-c", _TRACED_URLS], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == untraced


def test_tracing_config_leaves_bentoml_s_own_tracing_settings_alone() -> None:
    from service.app.tracing import UNTRACED, tracing_config

    assert tracing_config({}) == UNTRACED
    assert tracing_config({"BENTOML_CONFIG_OPTIONS": "api_server.workers=2"}) == UNTRACED
    assert tracing_config({"BENTOML_CONFIG_OPTIONS": "tracing.exporter_type=otlp"}) == {}
    assert tracing_config({"BENTOML_CONFIG": "bentoml.yaml"}) == {}

"""Shadow images on the real inference side (InferenceSide: the version manager, the batcher and
run_batch on a tiny SavedModel): sent as background items, they never share a batch with
callers' images, callers' images queued just after them run first, and a shadow sample that
callers keep waiting past its deadline is dropped (`busy`) while the shadow worker goes on.

Requests are held by the batcher itself: queued in one step of the event loop, before any
batch loop looks at the queue, or a caller's partial batch held for a fuller one
(GRAFT_BATCH_TIMEOUT_MS), so the order holds on any machine. The batcher's own rules (an idle
batcher only, withdrawal, close) are in tests/test_batcher.py; a real server's in
tests/test_shadow.py.
"""

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from support.exports import make_tiny_export, publish_tiny_model
from support.images import encode, random_rgb

from service.app.inference_side import InferenceSide
from service.gateway.shadow import ShadowRunner
from service.policy import ShadowPolicy
from service.settings import GraftSettings
from service.store.promotion import publish_candidate
from service.store.repository import ModelRepository
from service.wire import InferItem

MODEL = "tiny"
IMAGE = encode(random_rgb(8, 8), "PNG")
MIXES = ("http", "shadow", "http+shadow")  # graft_inference_batches_total's protocols
BUSY = ("graft_shadow_dropped_total", {"model": MODEL, "reason": "busy"})


@pytest.fixture(scope="module")
def model_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("lane") / "models"
    root.mkdir()
    publish_tiny_model(root, MODEL)
    return root


def _items(count: int, *, shadow: bool) -> list[InferItem]:
    """A request's items as the gateway (a caller) or the shadow runner sends them."""
    now, protocol = time.time(), "shadow" if shadow else "http"
    return [
        InferItem(
            model=MODEL, version=1, image=IMAGE, enqueued_at=now, protocol=protocol,
            background=shadow,
        )
        for _ in range(count)
    ]  # fmt: skip


def _batches() -> dict[str, float]:
    return {
        mix: REGISTRY.get_sample_value("graft_inference_batches_total", {"protocols": mix}) or 0
        for mix in MIXES
    }


def test_a_shadow_queued_before_callers_runs_after_them_in_a_batch_of_its_own(
    model_root: Path,
) -> None:
    settings = GraftSettings(
        model_root=model_root, default_model=MODEL, max_batch_size=8, batch_threads=1
    )
    side = InferenceSide.open(settings)
    before = _batches()

    async def scenario() -> None:
        try:
            # Queued first, with room for it in the callers' batch of 3 (the limit is 8).
            shadow = asyncio.create_task(side.infer(_items(2, shadow=True)))
            callers = asyncio.create_task(side.infer(_items(3, shadow=False)))
            done, _ = await asyncio.wait({shadow, callers}, return_when=asyncio.FIRST_COMPLETED)
            assert done == {callers}, "the shadow's images ran before or with the callers'"
            assert [r.error_code for r in callers.result()] == [None] * 3
            assert [r.error_code for r in await shadow] == [None] * 2
        finally:
            await side.close()

    asyncio.run(asyncio.wait_for(scenario(), 120))
    after = _batches()
    assert {mix: after[mix] - before[mix] for mix in MIXES} == {
        "http": 1,
        "shadow": 1,
        "http+shadow": 0,
    }


def test_a_sample_callers_hold_past_its_deadline_is_dropped_busy_and_the_next_one_runs(
    model_root: Path,
) -> None:
    settings = GraftSettings(
        model_root=model_root, default_model=MODEL, max_batch_size=8, batch_threads=1,
        batch_timeout_ms=120_000,  # a lone caller's image waits for a fuller batch: held
    )  # fmt: skip
    side = InferenceSide.open(settings)
    policy = ShadowPolicy(version=1, rate=1)
    busy_before = REGISTRY.get_sample_value(*BUSY) or 0

    async def labels(model: str, version: int) -> list[str]:
        return (await side.metadata(model, version)).labels

    async def scenario() -> None:
        runner = ShadowRunner(side, labels, queue_images=4, timeout_s=0.5)

        def sample() -> None:
            """One answered caller's sample, as the gateway leaves it."""
            queued = runner.offer(MODEL, policy, [IMAGE])
            assert queued is not None, "the shadow queue refused a sample"
            queued.answered([("red", 0.5)])

        try:
            held = asyncio.create_task(side.infer(_items(1, shadow=False)))
            await _until(lambda: side.batcher.queued() == 1)
            sample()
            await _until(lambda: runner.figures(MODEL, policy).dropped == {"busy": 1})
            assert not held.done(), "the caller was answered: nothing held the shadow back"
            assert REGISTRY.get_sample_value(*BUSY) == busy_before + 1
            held.cancel()  # the caller goes (its deadline): the batcher is idle from now on
            sample()
            await _until(lambda: runner.figures(MODEL, policy).compared == 1)
            figures = runner.figures(MODEL, policy)
            assert (figures.errors, figures.dropped) == (0, {"busy": 1})
        finally:
            await side.close()

    asyncio.run(asyncio.wait_for(scenario(), 120))


def test_a_sample_for_a_version_not_loaded_yet_is_dropped_not_counted_as_its_error(
    tmp_path: Path,
) -> None:
    """A policy that names a shadow version starts its load; samples meanwhile find it not
    loaded. The gateway may still know its labels (its metadata cache keeps them from an
    earlier load), so only the results tell."""
    root = tmp_path / "models"
    root.mkdir()
    publish_tiny_model(root, MODEL)  # v1: promoted, served
    candidate = make_tiny_export(tmp_path / "v2")
    publish_candidate(ModelRepository(root), candidate, MODEL)  # v2: on disk, not loaded
    side = InferenceSide.open(GraftSettings(model_root=root, default_model=MODEL))
    policy = ShadowPolicy(version=2, rate=1)

    async def cached_labels(model: str, version: int) -> list[str]:
        return (await side.metadata(model, 1)).labels  # v2's labels are v1's

    async def scenario() -> None:
        runner = ShadowRunner(side, cached_labels, queue_images=4, timeout_s=30)
        try:
            queued = runner.offer(MODEL, policy, [IMAGE])
            assert queued is not None, "the shadow queue refused a sample"
            queued.answered([("red", 0.5)])
            await _until(lambda: runner.figures(MODEL, policy).dropped)
            figures = runner.figures(MODEL, policy)
            assert (figures.errors, figures.compared) == (0, 0)
            assert figures.dropped == {"unavailable": 1}
        finally:
            await side.close()

    asyncio.run(asyncio.wait_for(scenario(), 120))


async def _until(condition: Callable[[], object], timeout_s: float = 60) -> object:
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        assert time.monotonic() < deadline, "timed out waiting for the shadow runner"
        await asyncio.sleep(0.01)
    return value

"""The adaptive batcher on its own: real asyncio, real threads, a real `run` that records its
batches. The server-level proofs (HTTP and gRPC share batches, batching off) are in
tests/test_grpc_server.py and tests/test_batching_off.py."""

import asyncio
import threading
import time
from collections.abc import Callable, Coroutine

import pytest

from service.runtime.batcher import Batcher

WAIT_S = 10.0  # how long a test waits for something that should happen at once


class Recorder:
    """`run` for the batcher: squares numbers and remembers every batch it was given, with how
    many other batches were running when it started."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.batches: list[list[int]] = []
        self.beside: list[int] = []
        self._gate = gate
        self._running = 0
        self._lock = threading.Lock()

    def __call__(self, items: list[int]) -> list[int]:
        with self._lock:
            self.batches.append(list(items))
            self.beside.append(self._running)
            self._running += 1
        try:
            if self._gate is not None:
                assert self._gate.wait(WAIT_S), "the test never opened the gate"
            return [i * i for i in items]
        finally:
            with self._lock:
                self._running -= 1


def run_async(scenario: Callable[[], Coroutine[None, None, None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_concurrent_callers_share_batches_and_get_their_own_results_in_order() -> None:
    gate = threading.Event()
    recorder = Recorder(gate)

    async def scenario() -> None:
        batcher = Batcher(recorder, max_batch_size=4, timeout_s=0, threads=1)
        first = await _running_first(batcher, recorder)  # occupies the only batch thread
        callers = [asyncio.create_task(batcher.submit([n, n + 100])) for n in range(2, 7)]
        await _until(lambda: batcher.queued() == 10)
        gate.set()
        assert await first == [1]
        for n, caller in zip(range(2, 7), callers, strict=True):
            assert await caller == [n * n, (n + 100) ** 2]
        await batcher.close()

    run_async(scenario)
    assert [len(b) for b in recorder.batches] == [1, 4, 4, 2]  # queued items merged, capped


def test_a_lone_request_runs_at_once_without_a_timeout() -> None:
    recorder = Recorder()

    async def scenario() -> None:
        batcher = Batcher(recorder, max_batch_size=8, timeout_s=0, threads=2)
        assert await batcher.submit([3]) == [9]
        await batcher.close()

    run_async(scenario)
    assert recorder.batches == [[3]]


def test_a_timeout_holds_a_partial_batch_for_late_callers() -> None:
    recorder = Recorder()

    async def scenario() -> None:
        batcher = Batcher(recorder, max_batch_size=8, timeout_s=5.0, threads=1)
        started = time.monotonic()
        callers = []
        for n in range(3):
            callers.append(asyncio.create_task(batcher.submit([n])))
            await asyncio.sleep(0.05)
        assert [await c for c in callers] == [[0], [1], [4]]
        assert time.monotonic() - started >= 4.5  # the partial batch waited for the timeout
        await batcher.close()

    run_async(scenario)
    assert recorder.batches == [[0, 1, 2]]


def test_a_full_batch_does_not_wait_for_the_timeout() -> None:
    recorder = Recorder()

    async def scenario() -> None:
        batcher = Batcher(recorder, max_batch_size=2, timeout_s=30.0, threads=1)
        started = time.monotonic()
        assert await batcher.submit([2, 3]) == [4, 9]
        assert time.monotonic() - started < 15
        await batcher.close()

    run_async(scenario)


def test_batch_threads_run_batches_at_the_same_time() -> None:
    both_running = threading.Barrier(2, timeout=WAIT_S)

    def run(items: list[int]) -> list[int]:
        both_running.wait()  # BrokenBarrierError unless a second batch runs meanwhile
        return items

    async def scenario() -> None:
        batcher = Batcher(run, max_batch_size=1, timeout_s=0, threads=2)
        assert await asyncio.gather(batcher.submit([1]), batcher.submit([2])) == [[1], [2]]
        await batcher.close()

    run_async(scenario)


def test_a_withdrawn_caller_costs_no_compute() -> None:
    gate = threading.Event()
    recorder = Recorder(gate)

    async def scenario() -> None:
        batcher = Batcher(recorder, max_batch_size=4, timeout_s=0, threads=1)
        first = await _running_first(batcher, recorder)
        withdrawn = asyncio.create_task(batcher.submit([2, 3]))
        kept = asyncio.create_task(batcher.submit([4]))
        await _until(lambda: batcher.queued() == 3)
        withdrawn.cancel()  # what a deadline or a client disconnect does
        await _until(lambda: batcher.queued() == 1)
        gate.set()
        assert await first == [1]
        assert await kept == [16]
        await batcher.close()

    run_async(scenario)
    assert recorder.batches == [[1], [4]]


def test_a_failing_batch_fails_only_its_own_callers() -> None:
    def run(items: list[int]) -> list[int]:
        if 13 in items:
            raise RuntimeError("unlucky batch")
        return items

    async def scenario() -> None:
        batcher = Batcher(run, max_batch_size=1, timeout_s=0, threads=1)
        unlucky, lucky = await asyncio.gather(
            batcher.submit([13]), batcher.submit([7]), return_exceptions=True
        )
        assert isinstance(unlucky, RuntimeError)
        assert lucky == [7]
        assert await batcher.submit([8]) == [8]  # the batch loop survived
        await batcher.close()

    run_async(scenario)


def test_close_cancels_every_waiting_caller() -> None:
    gate = threading.Event()
    recorder = Recorder(gate)

    async def scenario() -> None:
        batcher = Batcher(recorder, max_batch_size=1, timeout_s=0, threads=1)
        running = await _running_first(batcher, recorder)
        queued = asyncio.create_task(batcher.submit([2]))
        shadow = asyncio.create_task(batcher.submit([3], background=True))
        await _until(lambda: batcher.queued() == 1 and batcher.queued(background=True) == 1)
        threading.Timer(0.2, gate.set).start()  # the running batch finishes during close()
        await batcher.close()
        for caller in (running, queued, shadow):
            with pytest.raises(asyncio.CancelledError):
                await caller

    run_async(scenario)
    assert recorder.batches == [[1]]


def test_background_items_run_after_the_callers_queued_and_never_in_their_batch() -> None:
    gate = threading.Event()
    recorder = Recorder(gate)

    async def scenario() -> None:
        batcher = Batcher(recorder, max_batch_size=4, timeout_s=0, threads=1)
        first = await _running_first(batcher, recorder)  # occupies the only batch thread
        shadow = asyncio.create_task(batcher.submit([50, 51], background=True))
        await _until(lambda: batcher.queued(background=True) == 2)
        callers = [asyncio.create_task(batcher.submit(items)) for items in ([2], [3, 4])]
        await _until(lambda: batcher.queued() == 3)
        gate.set()
        assert [await c for c in (first, *callers)] == [[1], [4], [9, 16]]
        assert await shadow == [2500, 2601]
        await batcher.close()

    run_async(scenario)
    # The callers' batch had room for the shadow's items, and they had waited longer.
    assert recorder.batches == [[1], [2, 3, 4], [50, 51]]


def test_a_background_batch_starts_only_once_no_batch_runs() -> None:
    gate = threading.Event()
    recorder = Recorder(gate)

    async def scenario() -> None:
        batcher = Batcher(recorder, max_batch_size=4, timeout_s=0, threads=2)
        first = await _running_first(batcher, recorder)  # one thread busy, one free
        shadow = asyncio.create_task(batcher.submit([9], background=True))
        await _until(lambda: batcher.queued(background=True) == 1)
        second = asyncio.create_task(batcher.submit([2]))  # a caller takes the free thread
        await _until(lambda: len(recorder.batches) == 2)
        assert recorder.batches == [[1], [2]], "the shadow started beside a caller's batch"
        gate.set()
        assert [await first, await second, await shadow] == [[1], [4], [81]]
        await batcher.close()

    run_async(scenario)
    assert recorder.batches == [[1], [2], [9]]
    assert recorder.beside == [0, 1, 0]  # the shadow's batch ran alone


def test_a_lone_background_item_runs_at_once_on_an_idle_batcher() -> None:
    recorder = Recorder()

    async def scenario() -> None:
        batcher = Batcher(recorder, max_batch_size=8, timeout_s=30.0, threads=1)
        started = time.monotonic()
        assert await batcher.submit([5], background=True) == [25]
        assert time.monotonic() - started < 15  # not held for a fuller batch either
        await batcher.close()

    run_async(scenario)
    assert recorder.batches == [[5]]


def test_a_withdrawn_background_item_costs_no_compute() -> None:
    gate = threading.Event()
    recorder = Recorder(gate)

    async def scenario() -> None:
        batcher = Batcher(recorder, max_batch_size=4, timeout_s=0, threads=1)
        first = await _running_first(batcher, recorder)
        withdrawn = asyncio.create_task(batcher.submit([2], background=True))
        await _until(lambda: batcher.queued(background=True) == 1)
        withdrawn.cancel()  # the shadow's deadline passed
        await _until(lambda: batcher.queued(background=True) == 0)
        gate.set()
        assert await first == [1]
        assert await batcher.submit([3], background=True) == [9]
        await batcher.close()

    run_async(scenario)
    assert recorder.batches == [[1], [3]]


async def _running_first(batcher: Batcher, recorder: Recorder) -> asyncio.Task[list[int]]:
    """Item 1 submitted and running: it holds its batch thread until the recorder's gate opens."""
    first = asyncio.create_task(batcher.submit([1]))
    await _until(lambda: len(recorder.batches) == 1)
    return first


async def _until(condition: Callable[[], bool], timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the batcher"
        await asyncio.sleep(0.005)


def test_a_batch_is_closed_before_the_item_that_would_pass_its_cost_budget() -> None:
    gate = threading.Event()
    recorder = Recorder(gate)

    async def scenario() -> None:
        batcher = Batcher(
            recorder, max_batch_size=8, timeout_s=0, threads=1, cost=int, max_batch_cost=10
        )
        first = await _running_first(batcher, recorder)  # occupies the only batch thread
        callers = [asyncio.create_task(batcher.submit(i)) for i in ([4, 4], [3], [12], [2])]
        await _until(lambda: batcher.queued() == 5)
        gate.set()
        assert [await c for c in (first, *callers)] == [[1], [16, 16], [9], [144], [4]]
        await batcher.close()

    run_async(scenario)
    # 4 + 4 + 3 > 10; 3 + 12 > 10; 12 alone is over the budget and runs alone; 12 + 2 > 10.
    assert recorder.batches == [[1], [4, 4], [3], [12], [2]]


def test_a_cheap_item_never_waits_behind_heavy_ones() -> None:
    """Heavy items (cost >= 100) run in their own lane, one batch at a time on their own
    thread: with that thread held, a cheap caller (and a request's cheap item) still runs."""
    heavy_gate = threading.Event()
    batches: list[list[int]] = []

    def run(items: list[int]) -> list[int]:
        batches.append(list(items))
        if max(items) >= 100:
            assert heavy_gate.wait(WAIT_S), "the test never opened the gate"
        return [i * i for i in items]

    async def scenario() -> None:
        batcher = Batcher(
            run, max_batch_size=8, timeout_s=0, threads=1, cost=int, max_batch_cost=1000,
            heavy_cost=100,
        )  # fmt: skip
        heavy = asyncio.create_task(batcher.submit([400, 700, 500]))
        await _until(lambda: len(batches) == 1)  # the heavy lane's thread is held on [400]
        assert batcher.queued() == 2
        assert await batcher.submit([3, 5]) == [9, 25]
        mixed = asyncio.create_task(batcher.submit([2, 300]))
        await _until(lambda: len(batches) == 3)  # its 2 ran; its 300 waits for the heavy lane
        assert not heavy.done() and not mixed.done()
        heavy_gate.set()
        assert await heavy == [160_000, 490_000, 250_000]
        assert await mixed == [4, 90_000]
        await batcher.close()

    run_async(scenario)
    assert batches == [[400], [3, 5], [2], [700], [500, 300]]

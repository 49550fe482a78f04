"""Adaptive batching for the inference service, in the manner of TensorFlow Serving's batcher.

Callers from any number of concurrent requests (HTTP and gRPC alike) submit items; `threads`
batch loops each take what is queued, up to `max_batch_size` items, as soon as they are free,
waiting at most `timeout_s` (counted from the oldest queued item) for a fuller batch. Batches
run in worker threads, where TensorFlow releases the GIL, so up to `threads` batches overlap.
Under light load a lone request runs at once; under heavy load batches fill up by themselves.
Items whose caller gave up (deadline, disconnect) are dropped before they cost any compute.

Background items (`submit(..., background=True)`: shadow comparisons) wait in a lane of their
own and never delay a caller: a batch is either all callers' items or all background items,
and a background batch starts only when the batcher is idle, no caller's item queued and no
batch running. A caller that arrives meanwhile waits at most for that one batch: a model call
cannot be interrupted.

Each item has a cost (an image: its decoded pixels). A batch is closed before the item that
would take its cost over `max_batch_cost` (an item over it alone runs alone), and items of at
least `heavy_cost` wait in a lane of their own, run one batch at a time on a thread of their
own: a cheap image never waits behind a 40 MP decode, it only shares the cores with it.

Why graft batches itself instead of using BentoML's batchable APIs: docs/decisions.md, 34.
"""

import asyncio
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class _Pending(Generic[T, R]):
    item: T
    future: "asyncio.Future[R]"
    enqueued: float = field(default_factory=time.monotonic)
    cost: int = 1


class Batcher(Generic[T, R]):
    """Runs `run(batch) -> results` (one result per item, in order) on merged batches."""

    def __init__(
        self,
        run: Callable[[list[T]], list[R]],
        *,
        max_batch_size: int,
        timeout_s: float,
        threads: int,
        cost: Callable[[T], int] | None = None,
        max_batch_cost: int | None = None,
        heavy_cost: int | None = None,
    ) -> None:
        """`cost` None: every item costs 1; `max_batch_cost` None: no budget per batch;
        `heavy_cost` None: no lane for heavy items."""
        self._run = run
        self._cost = cost
        self._max_batch_cost = max_batch_cost
        self._heavy_cost = heavy_cost
        self._max_batch_size = max_batch_size
        self._timeout_s = timeout_s
        self._threads = threads
        self._queue: deque[_Pending[T, R]] = deque()  # callers' items
        self._background: deque[_Pending[T, R]] = deque()
        self._heavy: deque[_Pending[T, R]] = deque()  # callers' items of at least heavy_cost
        self._running = 0  # batches taken and not finished
        self._changed = asyncio.Condition()
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="graft-batch")
        self._heavy_pool = ThreadPoolExecutor(1, thread_name_prefix="graft-heavy")
        self._loops: list[asyncio.Task[None]] = []

    async def submit(self, items: list[T], *, background: bool = False) -> list[R]:
        """Results for `items`, in order. Cancelling the caller withdraws its queued items.
        `background` items run only while no caller's item waits (the module's docstring)."""
        if not self._loops:
            self._loops = [asyncio.create_task(self._batch_loop()) for _ in range(self._threads)]
            if self._heavy_cost is not None:
                self._loops.append(asyncio.create_task(self._heavy_loop()))
        loop = asyncio.get_running_loop()
        cost = self._cost or _one
        pending = [_Pending[T, R](item, loop.create_future(), cost=cost(item)) for item in items]
        async with self._changed:
            for one in pending:
                self._lane(one, background).append(one)
            self._changed.notify_all()
        # gather cancels every future if the caller is cancelled, so a batch loop skips them.
        return list(await asyncio.gather(*(p.future for p in pending)))

    def queued(self, *, background: bool = False) -> int:
        """Items waiting in the callers' lanes (heavy ones too), or in the background one."""
        lanes = (self._background,) if background else (self._queue, self._heavy)
        return sum(_live(lane) for lane in lanes)

    def _lane(self, pending: _Pending[T, R], background: bool) -> deque[_Pending[T, R]]:
        if background:
            return self._background
        heavy = self._heavy_cost is not None and pending.cost >= self._heavy_cost
        return self._heavy if heavy else self._queue

    async def close(self) -> None:
        """Stop the batch loops and cancel every caller still waiting; returns once the batches
        already running in threads have finished."""
        for task in self._loops:
            task.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        for pending in (*self._queue, *self._heavy, *self._background):
            pending.future.cancel()
        self._queue.clear()
        self._heavy.clear()
        self._background.clear()
        self._pool.shutdown(wait=True)
        self._heavy_pool.shutdown(wait=True)

    async def _batch_loop(self) -> None:
        while True:
            await self._run_taken(await self._next_batch())

    async def _heavy_loop(self) -> None:
        """The heavy lane: one batch at a time, on its own thread, whatever `threads` says."""
        while True:
            async with self._changed:
                await self._changed.wait_for(lambda: _has_live(self._heavy))
                batch = self._take(self._heavy)  # the head is live: never empty
                self._running += 1
            await self._run_taken(batch, self._heavy_pool)

    async def _run_taken(
        self, batch: list[_Pending[T, R]], pool: ThreadPoolExecutor | None = None
    ) -> None:
        """Run a batch counted in `_running` when it was taken; once it is done the batcher
        may be idle, so a waiting background batch is woken."""
        try:
            await self._execute(batch, pool)
        finally:
            self._running -= 1
        if self._background:
            async with self._changed:
                self._changed.notify_all()

    async def _next_batch(self) -> list[_Pending[T, R]]:
        async with self._changed:
            while True:
                await self._changed.wait_for(self._has_work)
                if self._has_live_items():
                    await self._wait_for_fuller_batch()
                    batch = self._take(self._queue)
                else:  # idle: _has_work allows the background lane only then
                    batch = self._take(self._background)
                if batch:  # another loop may have emptied the queue meanwhile
                    # Counted before the lock is released, so no other loop sees the
                    # batcher idle while this batch is on its way to a thread.
                    self._running += 1
                    return batch

    def _has_work(self) -> bool:
        """A caller's item waits, or a background one does and the batcher is idle: no batch
        running, no caller's item in either lane (a heavy one is the heavy loop's to take)."""
        if self._has_live_items():
            return True
        idle = self._running == 0 and not _has_live(self._heavy)
        return idle and _has_live(self._background)

    async def _wait_for_fuller_batch(self) -> None:
        """Hold a partial batch until the oldest item has waited `timeout_s` (lock held)."""
        while self._timeout_s > 0 and _live(self._queue) < self._max_batch_size:
            remaining = self._queue[0].enqueued + self._timeout_s - time.monotonic()
            if remaining <= 0:
                return
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                return
            if not self._has_live_items():
                return

    def _has_live_items(self) -> bool:
        """A caller's item waits."""
        return _has_live(self._queue)

    def _take(self, lane: deque[_Pending[T, R]]) -> list[_Pending[T, R]]:
        """Up to `max_batch_size` live items from the head of `lane`, closed before the one
        that would take the batch's cost over `max_batch_cost` (the first is always taken)."""
        batch: list[_Pending[T, R]] = []
        budget, total = self._max_batch_cost, 0
        while lane and len(batch) < self._max_batch_size:
            if lane[0].future.done():
                lane.popleft()
                continue
            if batch and budget is not None and total + lane[0].cost > budget:
                break
            pending = lane.popleft()
            total += pending.cost
            batch.append(pending)
        return batch

    async def _execute(
        self, batch: list[_Pending[T, R]], pool: ThreadPoolExecutor | None = None
    ) -> None:
        loop = asyncio.get_running_loop()
        items = [p.item for p in batch]
        try:
            results = await loop.run_in_executor(pool or self._pool, self._run, items)
        except asyncio.CancelledError:  # close(): the callers must not wait for ever
            for pending in batch:
                pending.future.cancel()
            raise
        except Exception as exc:  # `run` failed as a whole: every caller in it gets the error
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(exc)
            return
        for pending, result in zip(batch, results, strict=True):
            if not pending.future.done():
                pending.future.set_result(result)


def _one(item: object) -> int:
    return 1


def _live(lane: "deque[_Pending[T, R]]") -> int:
    return sum(1 for p in lane if not p.future.done())


def _has_live(lane: "deque[_Pending[T, R]]") -> bool:
    """Whether an item of `lane` still has a caller waiting (withdrawn ones leave its head)."""
    while lane and lane[0].future.done():
        lane.popleft()  # withdrawn by its caller
    return bool(lane)

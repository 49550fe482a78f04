"""Adaptive batching for the inference service, in the manner of TensorFlow Serving's batcher.

Callers from any number of concurrent requests (HTTP and gRPC alike) submit items; `threads`
batch loops each take what is queued, up to `max_batch_size` items, as soon as they are free,
waiting at most `timeout_s` (counted from the oldest queued item) for a fuller batch. Batches
run in worker threads, where TensorFlow releases the GIL, so up to `threads` batches overlap.
Under light load a lone request runs at once; under heavy load batches fill up by themselves.
Items whose caller gave up (deadline, disconnect) are dropped before they cost any compute.

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


class Batcher(Generic[T, R]):
    """Runs `run(batch) -> results` (one result per item, in order) on merged batches."""

    def __init__(
        self,
        run: Callable[[list[T]], list[R]],
        *,
        max_batch_size: int,
        timeout_s: float,
        threads: int,
    ) -> None:
        self._run = run
        self._max_batch_size = max_batch_size
        self._timeout_s = timeout_s
        self._threads = threads
        self._queue: deque[_Pending[T, R]] = deque()
        self._changed = asyncio.Condition()
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="graft-batch")
        self._loops: list[asyncio.Task[None]] = []

    async def submit(self, items: list[T]) -> list[R]:
        """Results for `items`, in order. Cancelling the caller withdraws its queued items."""
        if not self._loops:
            self._loops = [asyncio.create_task(self._batch_loop()) for _ in range(self._threads)]
        loop = asyncio.get_running_loop()
        pending = [_Pending[T, R](item, loop.create_future()) for item in items]
        async with self._changed:
            self._queue.extend(pending)
            self._changed.notify_all()
        # gather cancels every future if the caller is cancelled, so a batch loop skips them.
        return list(await asyncio.gather(*(p.future for p in pending)))

    def queued(self) -> int:
        return sum(1 for p in self._queue if not p.future.done())

    async def close(self) -> None:
        """Stop the batch loops and cancel every caller still waiting; returns once the batches
        already running in threads have finished."""
        for task in self._loops:
            task.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        for pending in self._queue:
            pending.future.cancel()
        self._queue.clear()
        self._pool.shutdown(wait=True)

    async def _batch_loop(self) -> None:
        while True:
            batch = await self._next_batch()
            await self._execute(batch)

    async def _next_batch(self) -> list[_Pending[T, R]]:
        async with self._changed:
            while True:
                await self._changed.wait_for(self._has_live_items)
                await self._wait_for_fuller_batch()
                batch = self._take()
                if batch:  # another loop may have emptied the queue meanwhile
                    return batch

    async def _wait_for_fuller_batch(self) -> None:
        """Hold a partial batch until the oldest item has waited `timeout_s` (lock held)."""
        while self._timeout_s > 0 and self.queued() < self._max_batch_size:
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
        while self._queue and self._queue[0].future.done():
            self._queue.popleft()  # withdrawn by its caller
        return bool(self._queue)

    def _take(self) -> list[_Pending[T, R]]:
        batch: list[_Pending[T, R]] = []
        while self._queue and len(batch) < self._max_batch_size:
            pending = self._queue.popleft()
            if not pending.future.done():
                batch.append(pending)
        return batch

    async def _execute(self, batch: list[_Pending[T, R]]) -> None:
        loop = asyncio.get_running_loop()
        try:
            results = await loop.run_in_executor(self._pool, self._run, [p.item for p in batch])
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

"""The inference side in the test process: the Gateway's backend without the BentoML hop, and an
event loop on a thread for servers that outlive single tests."""

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from service.runtime.batch_runner import metadata_of, run_batch
from service.runtime.versions import VersionManager
from service.wire import InferItem, InferResult, ModelMetadata, ModelStatus

T = TypeVar("T")


class InProcessInference:
    """The Gateway's InferenceBackend without the BentoML hop: same VersionManager, same
    run_batch, on a worker thread as in the inference service."""

    def __init__(self, manager: VersionManager) -> None:
        self._manager = manager
        self.running = threading.Event()  # a test clears it to hold admitted requests
        self.running.set()

    async def infer(self, items: list[InferItem]) -> list[InferResult]:
        if not self.running.is_set():
            await asyncio.to_thread(self.running.wait, 120)
        return await asyncio.to_thread(run_batch, self._manager, items)

    async def status(self) -> list[ModelStatus]:
        return self._manager.status()

    async def metadata(self, model: str, version: int) -> ModelMetadata:
        return metadata_of(self._manager.get(model, version))

    async def refresh(self) -> None:
        self._manager.refresh()


class LoopThread:
    """An asyncio loop on a thread, so the grpc.aio server outlives single tests."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, work: Coroutine[Any, Any, T], timeout_s: float = 120) -> T:
        return asyncio.run_coroutine_threadsafe(work, self.loop).result(timeout_s)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)

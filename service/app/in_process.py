"""The one-process layout's InferenceBackend: the inference side, opened in the entry worker.

The entry worker starts answering (/livez, /readyz 503) at once and opens the inference side in
a thread meanwhile: importing TensorFlow and loading every model takes seconds, and the
supervisor and Kubernetes probe the worker from its start. Until it is open, the model status
is NotReady (so /readyz stays 503), and every other call waits for it within the caller's
deadline, as calls queued for an inference process that is still starting do: a request that
reaches a restarted worker is answered once the models are back.
"""

import asyncio
import logging

from service.app.heap import FrozenHeap
from service.app.inference_side import InferenceSide
from service.errors import NotReady
from service.settings import GraftSettings
from service.wire import InferItem, InferResult, ModelMetadata, ModelStatus

logger = logging.getLogger("graft.service")


class InProcessInference:
    """Calls go straight to the InferenceSide: no socket, no serialisation, no image copy."""

    def __init__(self, settings: GraftSettings) -> None:
        self._settings = settings
        self._side: InferenceSide | None = None
        self._opening: asyncio.Task[None] | None = None
        self._heap = FrozenHeap()

    def start(self) -> None:
        """Open the inference side in a worker thread (call on the serving event loop)."""
        self._opening = asyncio.create_task(self._open())

    async def close(self) -> None:
        if self._opening is not None:
            await asyncio.gather(self._opening, return_exceptions=True)
        if self._side is not None:
            await self._side.close()

    async def infer(self, items: list[InferItem]) -> list[InferResult]:
        side = self._side or await self._opened()
        return await side.infer(items)

    async def status(self) -> list[ModelStatus]:
        if self._side is None:
            raise NotReady("the models are still loading; retry shortly")
        statuses = await self._side.status()
        self._heap.track(statuses)
        return statuses

    async def metadata(self, model: str, version: int) -> ModelMetadata:
        return await (await self._opened()).metadata(model, version)

    async def check_model(self, folder: str, name: str) -> None:
        await (await self._opened()).check_model(folder, name)

    async def refresh(self) -> None:
        await (await self._opened()).refresh()

    async def _open(self) -> None:
        try:
            self._side = await asyncio.to_thread(InferenceSide.open, self._settings)
        except Exception:
            # Nothing can be served: stop the worker, so that BentoML restarts it and the log
            # says why, instead of a live worker that is never ready.
            logger.exception("the inference side failed to open")
            raise SystemExit(1) from None

    async def _opened(self) -> InferenceSide:
        """The side, once open; a caller that gives up (its deadline) leaves the opening be."""
        if self._side is None:
            assert self._opening is not None, "start() was never called"
            await asyncio.shield(self._opening)
            assert self._side is not None  # _open either sets it or ends the worker
        return self._side

"""The inference side itself: the version manager, the adaptive batcher and push gate 4.

One implementation, owned by whichever process serves the models: the `Inference` BentoML
service in the two-process layout (GRAFT_WORKERS > 1), or the one entry worker itself
(GRAFT_WORKERS = 1), where the Gateway calls it directly, with no socket, no second request
parse and no copy of the images. It is an InferenceBackend (service.wire) either way.

TensorFlow is imported when one is created, never at module import: the entry process imports
this module in both layouts and must stay light when it does not own the models.
"""

import asyncio
from functools import partial
from pathlib import Path
from typing import Any

from service.errors import GraftError, RejectedModel
from service.image_check import header_cost
from service.settings import GraftSettings
from service.store.load_records import LoadRecords, default_state_dir
from service.store.single_model import open_repository
from service.wire import InferItem, InferResult, ModelMetadata, ModelStatus


class InferenceSide:
    """The loaded models and the batcher that every request's images go through.

    `open` creates one and loads what the repository holds (seconds: TensorFlow, then every
    model's load and warm-up), so that the first request finds a warm model.
    """

    @classmethod
    def open(cls, settings: GraftSettings) -> "InferenceSide":
        side = cls(settings)
        side.manager.start()  # the first load is synchronous; polling goes on in a thread
        return side

    def __init__(self, settings: GraftSettings) -> None:
        from service.runtime.batch_runner import run_batch
        from service.runtime.batcher import Batcher
        from service.runtime.networks import engine_for
        from service.runtime.versions import VersionManager

        repository = open_repository(settings.model_root, settings.model_name)
        state = settings.state_dir or default_state_dir(repository)
        self.engine = engine_for(settings)
        self.manager = VersionManager(
            repository, settings.poll_interval_s, records=LoadRecords(state), engine=self.engine
        )
        self.batcher: Any = Batcher(
            partial(run_batch, self.manager),
            max_batch_size=settings.max_batch_size,
            timeout_s=settings.batch_timeout_ms / 1000,
            threads=settings.batch_threads,
            cost=_decoded_pixels,
            max_batch_cost=settings.max_batch_pixels,
            heavy_cost=settings.heavy_image_pixels or None,
        )

    async def close(self) -> None:
        await self.batcher.close()
        self.manager.stop()

    def ready(self, model: str) -> bool:
        return self.manager.ready(model)

    async def infer(self, items: list[InferItem]) -> list[InferResult]:
        # One call is one request's images; a caller's are never held back as background.
        background = all(item.background for item in items)
        return await self.batcher.submit(items, background=background)

    async def status(self) -> list[ModelStatus]:
        return self.manager.status()  # in memory, under a lock held only for a copy

    async def metadata(self, model: str, version: int) -> ModelMetadata:
        from service.runtime.batch_runner import metadata_of

        return metadata_of(self.manager.get(model, version))

    async def check_model(self, folder: str, name: str) -> None:
        """Push gate 4 (denied ops, load, signatures, warm-up), in a worker thread: loading a
        model takes seconds and must not hold the event loop."""
        await asyncio.to_thread(_check_model, Path(folder), name, self.engine)

    async def refresh(self) -> None:
        await asyncio.to_thread(self.manager.refresh)


def _decoded_pixels(item: InferItem) -> int:
    """What decoding the item costs the batch, from its header (the upload's, or the entry's
    re-encode's): microseconds, on the event loop."""
    return header_cost(item.image).pixels


def _check_model(folder: Path, name: str, engine: Any) -> None:
    from service.runtime.model_check import check_model

    try:
        check_model(folder, name, engine)
    except GraftError:
        raise
    except Exception as exc:  # TensorFlow's loader raises many types on a hostile model
        raise RejectedModel(f"the model cannot be loaded: {exc}") from exc

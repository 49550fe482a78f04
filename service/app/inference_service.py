"""`Inference`, the internal BentoML service of the two-process layout (GRAFT_WORKERS > 1).

One worker process that owns the inference side (service.app.inference_side: the loaded models
and graft's adaptive batcher) for every entry worker, which reach it over a Unix socket. With
GRAFT_WORKERS = 1 the one entry worker owns the inference side itself and this service is not
started (service.app.entry).
"""

import bentoml

from service.app.heap import FrozenHeap
from service.app.inference_side import InferenceSide
from service.app.process import INFERENCE_TIMEOUT_S, SETTINGS
from service.app.replies import InferReply, MetadataReply, Reply, StatusReply
from service.app.tracing import tracing_config
from service.errors import GraftError
from service.wire import InferItem


@bentoml.service(
    name="graft-inference",
    workers=1,
    traffic={"timeout": INFERENCE_TIMEOUT_S},
    # Its callers are graft's own entry workers, which log every client request already.
    logging={"access": {"enabled": False}},
    tracing=tracing_config(),
)
class Inference:
    def __init__(self) -> None:
        # TensorFlow is imported here, in the inference process only: the entry process imports
        # this module too (for `bentoml.depends`) and must stay light.
        self.side = InferenceSide.open(SETTINGS)
        self._heap = FrozenHeap()

    @bentoml.on_shutdown
    async def stop(self) -> None:
        await self.side.close()

    def __is_ready__(self) -> bool:
        return self.side.ready(SETTINGS.default_model)

    @bentoml.api
    async def infer(self, items: list[InferItem]) -> InferReply:
        return InferReply(results=await self.side.infer(items))

    @bentoml.api
    async def status(self) -> StatusReply:
        statuses = await self.side.status()
        self._heap.track(statuses)
        return StatusReply(models=statuses)

    @bentoml.api
    async def metadata(self, model: str, version: int) -> MetadataReply:
        try:
            return MetadataReply(metadata=await self.side.metadata(model, version))
        except GraftError as exc:
            return MetadataReply(error_code=exc.code, error=exc.message)

    @bentoml.api
    async def check_model(self, folder: str, name: str) -> Reply:
        """Push gate 4 where TensorFlow lives; its refusal crosses the socket as data."""
        try:
            await self.side.check_model(folder, name)
        except GraftError as exc:
            return Reply.of(exc)
        return Reply()

    @bentoml.api
    async def refresh(self) -> bool:
        await self.side.refresh()
        return True

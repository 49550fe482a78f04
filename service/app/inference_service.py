"""`Inference`, the internal BentoML service: owns the loaded models and batches every image.

One worker process: the models live there once, and TensorFlow already uses every core. Its
`infer` API hands items to graft's adaptive batcher (service.runtime.batcher), which merges the
images of concurrent requests, from every protocol, into batches of SavedModel calls, several
running at once.
"""

from functools import partial
from pathlib import Path

import bentoml

from service.app.process import INFERENCE_TIMEOUT_S, SETTINGS
from service.app.replies import InferReply, MetadataReply, Reply, StatusReply
from service.errors import GraftError, RejectedModel
from service.store.single_model import open_repository
from service.wire import InferItem


@bentoml.service(
    name="graft-inference",
    workers=1,
    traffic={"timeout": INFERENCE_TIMEOUT_S},
    # Its callers are graft's own entry workers, which log every client request already.
    logging={"access": {"enabled": False}},
)
class Inference:
    def __init__(self) -> None:
        # TensorFlow is imported here, in the inference process only: the entry process imports
        # this module too (for `bentoml.depends`) and must stay light.
        from service.runtime.batch_runner import run_batch
        from service.runtime.batcher import Batcher
        from service.runtime.versions import VersionManager

        repository = open_repository(SETTINGS.model_root, SETTINGS.model_name)
        self.manager = VersionManager(repository, SETTINGS.poll_interval_s)
        self.manager.start()
        self.batcher = Batcher(
            partial(run_batch, self.manager),
            max_batch_size=SETTINGS.max_batch_size,
            timeout_s=SETTINGS.batch_timeout_ms / 1000,
            threads=SETTINGS.batch_threads,
        )

    @bentoml.on_shutdown
    async def stop(self) -> None:
        await self.batcher.close()
        self.manager.stop()

    def __is_ready__(self) -> bool:
        return self.manager.ready(SETTINGS.default_model)

    @bentoml.api
    async def infer(self, items: list[InferItem]) -> InferReply:
        return InferReply(results=await self.batcher.submit(items))

    @bentoml.api
    def status(self) -> StatusReply:
        return StatusReply(models=self.manager.status())

    @bentoml.api
    def metadata(self, model: str, version: int) -> MetadataReply:
        from service.runtime.batch_runner import metadata_of

        try:
            return MetadataReply(metadata=metadata_of(self.manager.get(model, version)))
        except GraftError as exc:
            return MetadataReply(error_code=exc.code, error=exc.message)

    @bentoml.api
    def check_model(self, folder: str, name: str) -> Reply:
        """Push gate 4 (denied ops, load, signatures, warm-up) where TensorFlow lives."""
        from service.runtime.model_check import check_model

        try:
            check_model(Path(folder), name)
        except GraftError as exc:
            return Reply.of(exc)
        except Exception as exc:  # TensorFlow's loader raises many types on a hostile model
            return Reply.of(RejectedModel(f"the model cannot be loaded: {exc}"))
        return Reply()

    @bentoml.api
    def refresh(self) -> bool:
        self.manager.refresh()
        return True

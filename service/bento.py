"""graft's BentoML services: `Graft` (the entry service) and `Inference` (internal).

- `Inference` owns the loaded models (through the VersionManager) and the `infer` API, whose
  adaptive batcher (service.batcher) merges the images of concurrent requests, from every
  protocol, into batches of SavedModel calls, several running at once. One worker process:
  the models live there once, and TensorFlow already uses every core.
- `Graft` is what clients reach: the HTTP routes (a Starlette app mounted at /), the request
  guard (no pickle, body limits), readiness, metrics and the management API, and the gRPC
  server when `grpc_port` is not 0. It never imports TensorFlow, so extra entry workers
  (`GRAFT_WORKERS`) are cheap. It reaches `Inference` through `bentoml.depends`: over a Unix
  socket in production, in-process under `bentoml serve --development`.

Settings are read once per process from GRAFT_* variables (`graft serve` exports them).
"""

import asyncio
import importlib.util
import logging
import math
import sys
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import bentoml
from pydantic import BaseModel

from service import traffic
from service.asgi_guard import RequestGuard
from service.batcher import Batcher
from service.errors import GraftError, RejectedModel
from service.gateway import Gateway, error_from_code
from service.http_api import build_app
from service.inference import InferItem, InferResult, ModelMetadata, metadata_of, run_batch
from service.manager import ModelStatus, VersionManager
from service.push import validate_export
from service.repository import ModelRepository
from service.settings import GraftSettings

logger = logging.getLogger("graft.service")
SETTINGS = GraftSettings()
traffic.install()  # before BentoML builds the apps of these services


def traffic_timeouts_s(settings: GraftSettings) -> tuple[float, float]:
    """BentoML's traffic timeouts (inference, entry): backstops behind graft's own bounds.

    BentoML cuts any call that outlives them, so they must outlast the longest of those
    bounds: a request's deadline and a push's model check (load + warm-up, GRAFT_PUSH_CHECK_
    TIMEOUT_S). A push request also spends time receiving and publishing around its check.
    """
    inference = max(settings.request_timeout_s, settings.push_check_timeout_s) + 10
    return inference, inference + settings.request_timeout_s


_INFERENCE_TIMEOUT_S, _ENTRY_TIMEOUT_S = traffic_timeouts_s(SETTINGS)
_RETRIES = 8  # after a connection-level failure: enough to drain a pool of dead connections


class Reply(BaseModel):
    """A GraftError, if any, across the process boundary (BentoML would turn it into a 500)."""

    error_code: str | None = None
    error: str | None = None

    @classmethod
    def of(cls, exc: GraftError) -> "Reply":
        return cls(error_code=exc.code, error=exc.message)

    def raise_error(self) -> None:
        if self.error_code is not None:
            raise error_from_code(self.error_code, self.error or "failed")


class MetadataReply(Reply):
    metadata: ModelMetadata | None = None


# Replies are plain models, never bare lists: BentoML renders a list reply through a root model
# whose JSON schema it rebuilds on every call to pick the content type (1-1.4 ms of CPU each).
class InferReply(BaseModel):
    results: list[InferResult]


class StatusReply(BaseModel):
    models: list[ModelStatus]


@bentoml.service(
    name="graft-inference",
    workers=1,
    traffic={"timeout": _INFERENCE_TIMEOUT_S},
    # Its callers are graft's own entry workers, which log every client request already.
    logging={"access": {"enabled": False}},
)
class Inference:
    def __init__(self) -> None:
        repository = ModelRepository(SETTINGS.model_root)
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
        try:
            return MetadataReply(metadata=metadata_of(self.manager.get(model, version)))
        except GraftError as exc:
            return MetadataReply(error_code=exc.code, error=exc.message)

    @bentoml.api
    def check_export(self, folder: str, name: str) -> Reply:
        """Push gate 4 (denied ops, load, signatures, warm-up) where TensorFlow lives."""
        try:
            validate_export(Path(folder), name)
        except GraftError as exc:
            return Reply.of(exc)
        except Exception as exc:  # TensorFlow's loader raises many types on a hostile model
            return Reply.of(RejectedModel(f"the model cannot be loaded: {exc}"))
        return Reply()

    @bentoml.api
    def refresh(self) -> bool:
        self.manager.refresh()
        return True


class _InferenceClient:
    """The Gateway's InferenceBackend on top of the `Inference` dependency.

    BentoML 1.4's dependency client recycles its aiohttp session every 100 requests by closing
    it, which cuts the requests still in flight on it ("Server disconnected", bentoml#4971).
    Recycling is turned off here, and every call (all are idempotent) is retried after a
    connection-level failure; that also carries requests over a restart of the inference
    process, whose socket (held by BentoML's supervisor) queues them for the new worker.
    """

    def __init__(self, inference: Any) -> None:
        self._inference = inference
        sessions = getattr(inference.to_async, "_session_manager", None)
        if sessions is not None:  # absent in-process (bentoml serve --development)
            sessions.max_requests = sys.maxsize
            sessions.max_age = math.inf

    async def infer(self, items: list[InferItem]) -> list[InferResult]:
        return InferReply.model_validate(await self._retrying("infer", items)).results

    async def status(self) -> list[ModelStatus]:
        return StatusReply.model_validate(await self._retrying("status")).models

    async def metadata(self, model: str, version: int) -> ModelMetadata:
        reply = MetadataReply.model_validate(await self._retrying("metadata", model, version))
        reply.raise_error()
        assert reply.metadata is not None  # a reply without an error carries the metadata
        return reply.metadata

    async def check_export(self, folder: str, name: str) -> None:
        Reply.model_validate(await self._retrying("check_export", folder, name)).raise_error()

    async def refresh(self) -> None:
        await self._retrying("refresh")

    async def _retrying(self, api: str, *args: Any) -> Any:
        call = getattr(self._inference.to_async, api)
        for attempt in range(_RETRIES + 1):
            try:
                return await call(*args)
            except (aiohttp.ClientConnectionError, ConnectionError) as exc:
                if attempt == _RETRIES:
                    raise
                # Each failure discards one dead pooled connection; the gateway's deadline
                # bounds the whole loop.
                logger.warning("inference %s: %s; retrying", api, exc)
                await asyncio.sleep(min(0.05 * 2**attempt, 1.0))
        raise AssertionError("unreachable")


def _serves_grpc() -> bool:
    """gRPC runs in the first entry worker only: one port cannot be bound twice (the gRPC
    server refuses SO_REUSEPORT so that a port clash fails loudly), and every worker's
    Gateway feeds the same inference batches anyway."""
    from bentoml._internal.context import server_context

    first_worker = server_context.worker_index in (None, 1)
    available = importlib.util.find_spec("service.grpc_server") is not None
    return bool(SETTINGS.grpc_port) and first_worker and available


def _current_gateway() -> Gateway:
    return bentoml.get_current_service().gateway


@bentoml.asgi_app(build_app(_current_gateway), path="/")
@bentoml.service(name="graft", workers=SETTINGS.workers, traffic={"timeout": _ENTRY_TIMEOUT_S})
class Graft:
    inference = bentoml.depends(Inference)

    def __init__(self) -> None:
        self.gateway = Gateway(_InferenceClient(self.inference), SETTINGS)
        self._watcher: asyncio.Task[None] | None = None
        self._grpc: Any = None

    @bentoml.on_startup
    async def start(self) -> None:
        self._watcher = asyncio.create_task(self.gateway.watch_status())
        if _serves_grpc():
            from service.grpc_server import start_grpc_server

            self._grpc = await start_grpc_server(self.gateway, SETTINGS)

    @bentoml.on_shutdown
    async def stop(self) -> None:
        if self._grpc is not None:
            from service.grpc_server import stop_grpc_server

            await stop_grpc_server(self._grpc)
        if self._watcher is not None:
            self._watcher.cancel()

    async def __is_ready__(self) -> bool:
        return self.gateway.ready()


Graft.add_asgi_middleware(
    RequestGuard, max_body_bytes=SETTINGS.max_body_bytes, max_push_bytes=SETTINGS.max_push_bytes
)

"""The Gateway's InferenceBackend on top of the `Inference` BentoML dependency."""

import asyncio
import logging
import math
import sys
from typing import Any

import aiohttp

from service.app.replies import InferReply, MetadataReply, Reply, StatusReply
from service.wire import InferItem, InferResult, ModelMetadata, ModelStatus

logger = logging.getLogger("graft.service")
_RETRIES = 8  # after a connection-level failure: enough to drain a pool of dead connections


class InferenceClient:
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

    async def check_model(self, folder: str, name: str) -> None:
        Reply.model_validate(await self._retrying("check_model", folder, name)).raise_error()

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

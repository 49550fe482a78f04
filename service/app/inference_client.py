"""The Gateway's InferenceBackend on top of the `Inference` BentoML dependency."""

import asyncio
import logging
import math
import sys
from typing import Any

import aiohttp

from service.app.replies import InferReply, MetadataReply, Reply, StatusReply
from service.errors import GraftError
from service.wire import InferItem, InferResult, ModelMetadata, ModelStatus

logger = logging.getLogger("graft.service")
_CONNECT_RETRIES = 8  # never delivered: the connection itself failed
_REPLAYS = 1  # possibly delivered: the connection broke after the request went out


class InferenceClient:
    """The Gateway's InferenceBackend on top of the `Inference` dependency.

    BentoML 1.4's dependency client recycles its aiohttp session every 100 requests by closing
    it, which cuts the requests still in flight on it ("Server disconnected", bentoml#4971).
    Recycling is turned off here. A call that could not connect was never delivered and is
    retried (within the gateway's deadline). A call whose connection broke after it was sent
    may have reached the inference process, and may even be what killed it: it is replayed
    once, no more, so a request that crashes the process cannot crash every restarted one.
    That one replay also covers a pooled connection that died idle (a restarted inference
    process), and carries the call over the restart: the socket, held by BentoML's
    supervisor, queues it for the new worker.
    """

    def __init__(self, inference: Any, server_idle_close_s: float) -> None:
        self._inference = inference
        sessions = getattr(inference.to_async, "_session_manager", None)
        if sessions is not None:  # absent in-process (bentoml serve --development)
            sessions.max_requests = sys.maxsize
            sessions.max_age = math.inf
            _reuse_idle_connections_for(sessions, server_idle_close_s / 2)

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
        refused = replayed = 0
        while True:
            try:
                return await call(*args)
            except aiohttp.ClientConnectorError as exc:  # before any byte of the call was sent
                refused += 1
                if refused > _CONNECT_RETRIES:
                    raise
                logger.warning("inference %s: %s; retrying", api, exc)
                await asyncio.sleep(min(0.05 * 2**refused, 1.0))
            except (aiohttp.ClientConnectionError, ConnectionError) as exc:
                replayed += 1
                if replayed > _REPLAYS:
                    logger.error("inference %s: %s again; not sent a third time", api, exc)
                    raise GraftError(
                        "the inference process went away twice while answering this request; "
                        "it is not sent again, since it may be what stops it (see the server log)"
                    ) from exc
                logger.warning("inference %s: %s; sending it once more", api, exc)


def _reuse_idle_connections_for(sessions: Any, idle_s: float) -> None:
    """aiohttp reuses an idle connection for 15 s, but the inference server closes one idle
    for `GRAFT_HEADER_TIMEOUT_S` or uvicorn's 5 s keep-alive. While the entry's event loop is
    busy it has not yet read that close, and a call sent on such a connection breaks after
    being sent, as does its one replay on the next: a 500 for a request that never reached
    the model. Connections idle for half the server's limit are dropped, not reused."""
    make_client = sessions._make_client

    def with_short_keepalive() -> Any:
        session = make_client()
        session.connector._keepalive_timeout = idle_s  # aiohttp checks it on every reuse
        return session

    sessions._make_client = with_short_keepalive

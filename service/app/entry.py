"""`Graft`, the entry BentoML service: what clients reach.

The HTTP routes (a Starlette app mounted at /), the request guard (no pickle, body limits),
readiness, metrics and the management API, and the gRPC server when `grpc_port` is not 0. It
never imports TensorFlow, so extra entry workers (`GRAFT_WORKERS`) are cheap. It reaches
`Inference` through `bentoml.depends`: over a Unix socket in production, in-process under
`bentoml serve --development`.
"""

import asyncio
import importlib.util
from typing import Any

import bentoml

from service.app.drain import draining
from service.app.inference_client import InferenceClient
from service.app.inference_service import Inference
from service.app.process import ENTRY_TIMEOUT_S, SETTINGS
from service.gateway import Gateway
from service.protocol.http import endpoint_labels
from service.protocol.http.guard import RequestGuard
from service.protocol.http.routes import build_app


def _serves_grpc() -> bool:
    """gRPC runs in the first entry worker only: one port cannot be bound twice (the gRPC
    server refuses SO_REUSEPORT so that a port clash fails loudly), and every worker's
    Gateway feeds the same inference batches anyway."""
    from bentoml._internal.context import server_context

    first_worker = server_context.worker_index in (None, 1)
    available = importlib.util.find_spec("service.protocol.grpc.server") is not None
    return bool(SETTINGS.grpc_port) and first_worker and available


def _current_gateway() -> Gateway:
    return bentoml.get_current_service().gateway


HTTP_APP = build_app(_current_gateway)
endpoint_labels.install(HTTP_APP.routes)  # before BentoML builds the apps of these services


@bentoml.asgi_app(HTTP_APP, path="/")
@bentoml.service(name="graft", workers=SETTINGS.workers, traffic={"timeout": ENTRY_TIMEOUT_S})
class Graft:
    inference = bentoml.depends(Inference)

    def __init__(self) -> None:
        self.gateway = Gateway(InferenceClient(self.inference), SETTINGS, draining=draining)
        self._watcher: asyncio.Task[None] | None = None
        self._grpc: Any = None

    @bentoml.on_startup
    async def start(self) -> None:
        self._watcher = asyncio.create_task(self.gateway.watch_status())
        if _serves_grpc():
            from service.protocol.grpc.server import start_grpc_server

            self._grpc = await start_grpc_server(self.gateway, SETTINGS)

    @bentoml.on_shutdown
    async def stop(self) -> None:
        if self._grpc is not None:
            from service.protocol.grpc.server import stop_grpc_server

            await stop_grpc_server(self._grpc)
        if self._watcher is not None:
            self._watcher.cancel()

    async def __is_ready__(self) -> bool:
        return self.gateway.ready()


Graft.add_asgi_middleware(
    RequestGuard, max_body_bytes=SETTINGS.max_body_bytes, max_push_bytes=SETTINGS.max_push_bytes
)

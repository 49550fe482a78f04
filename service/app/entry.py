"""`Graft`, the entry BentoML service: what clients reach.

The HTTP routes (a Starlette app mounted at /), the request guard (no pickle, body limits),
readiness, metrics and the management API, and the gRPC server when `grpc_port` is not 0.

Two layouts, chosen from the settings when a worker imports this module (every worker of one
server reads the same settings, so all build the same service):

- one process (GRAFT_WORKERS = 1, the default): the entry worker owns the inference side
  itself (service.app.in_process) and the Gateway calls it directly;
- two services (GRAFT_WORKERS > 1, or GRAFT_SEPARATE_INFERENCE): the entry workers never
  import TensorFlow, so extra ones are cheap, and share `Inference`, one process that owns
  the models, through `bentoml.depends`: over a Unix socket in production, in-process under
  `bentoml serve --development`.
"""

import asyncio
import importlib.util
from typing import Any

import bentoml

from service.app.drain import draining
from service.app.in_process import InProcessInference
from service.app.inference_client import InferenceClient
from service.app.inference_service import Inference
from service.app.process import ENTRY_TIMEOUT_S, SETTINGS
from service.app.tracing import tracing_config
from service.gateway import Gateway
from service.protocol.http import connections, endpoint_labels
from service.protocol.http.guard import RequestGuard
from service.protocol.http.routes import build_app
from service.settings import GraftSettings
from service.wire import InferenceBackend


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
connections.install(SETTINGS.header_timeout_s)  # before uvicorn starts serving


class _Entry:
    """What both layouts share: the Gateway over a backend, the status watcher, gRPC."""

    def __init__(self) -> None:
        self.gateway = Gateway(self._backend(), SETTINGS, draining=draining)
        self._watcher: asyncio.Task[None] | None = None
        self._grpc: Any = None

    def _backend(self) -> InferenceBackend:
        raise NotImplementedError

    def _open_backend(self) -> None:
        """Called first at start-up (on the serving event loop)."""

    async def _close_backend(self) -> None:
        """Called last at shut-down, once nothing can send a request any more."""

    @bentoml.on_startup
    async def start(self) -> None:
        self._open_backend()
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
        await self._close_backend()

    async def __is_ready__(self) -> bool:
        return self.gateway.ready()


class OneProcess(_Entry):
    """The entry worker owns the inference side: one worker, GRAFT_SEPARATE_INFERENCE off."""

    def _backend(self) -> InferenceBackend:
        self._inference = InProcessInference(SETTINGS)
        return self._inference

    def _open_backend(self) -> None:
        self._inference.start()

    async def _close_backend(self) -> None:
        await self._inference.close()


class TwoServices(_Entry):
    """The entry workers call the `Inference` service."""

    inference = bentoml.depends(Inference)

    def _backend(self) -> InferenceBackend:
        return InferenceClient(self.inference, connections.idle_close_s(SETTINGS.header_timeout_s))


def _service(layout: type[_Entry]) -> Any:
    service = bentoml.asgi_app(HTTP_APP, path="/")(
        bentoml.service(
            name="graft",
            workers=SETTINGS.workers,
            traffic={"timeout": ENTRY_TIMEOUT_S},
            # Off by default: the log line of every request costs the event loop 8 % of its
            # time (decision 50), and graft_request_duration_seconds counts the requests.
            logging={"access": {"enabled": SETTINGS.access_log}},
            tracing=tracing_config(),
        )(layout)
    )
    service.add_asgi_middleware(RequestGuard, settings=SETTINGS)
    return service


def two_services(settings: GraftSettings) -> bool:
    return settings.workers > 1 or settings.separate_inference


Graft = _service(TwoServices if two_services(SETTINGS) else OneProcess)

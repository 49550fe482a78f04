"""grpc.health.v1.Health answered from the Gateway's readiness, per model name too.

The stock servicer needs every service name registered up front; graft's models come and go
with the repository, so status is computed on each Check and re-polled for Watch.
"""

import asyncio
from collections.abc import AsyncIterator, Collection

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.gateway import Gateway

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
WATCH_POLL_S = 0.5


class GatewayHealthServicer(health_pb2_grpc.HealthServicer):
    """`""` and the served gRPC service names: the default model is warm. Any other name is
    taken as a model name: SERVING once that model has a warm version, NOT_SERVING until then
    (a model may be published at any time, so an unknown name is not an error)."""

    def __init__(self, gateway: Gateway, services: Collection[str]) -> None:
        self._gateway = gateway
        self._services = frozenset(services)

    def status(self, service: str) -> health_pb2.HealthCheckResponse.ServingStatus:
        model = None if service == "" or service in self._services else service
        return SERVING if self._gateway.ready(model) else NOT_SERVING

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        return health_pb2.HealthCheckResponse(status=self.status(request.service))

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        last = None
        while True:
            status = self.status(request.service)
            if status != last:
                yield health_pb2.HealthCheckResponse(status=status)
                last = status
            await asyncio.sleep(WATCH_POLL_S)

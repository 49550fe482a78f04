"""graft.v1.ImageClassifier: classify encoded images through the shared Gateway."""

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc

from service.errors import GraftError
from service.gateway import Gateway
from service.graft_v1 import to_proto
from service.protocol.grpc_status import PROTOCOL, client_key, deadline_of, guarded
from service.schemas import DEFAULT_TOP_K
from service.stubs.graft.v1 import classifier_pb2 as pb
from service.stubs.graft.v1 import classifier_pb2_grpc as pb_grpc

# Requests of one stream that may be in flight at once. Enough for a stream to fill inference
# batches on its own; bounded so a fast sender cannot queue unbounded work on the server.
STREAM_WINDOW = 32
# Metric route labels: the gRPC method paths.
CLASSIFY_ROUTE = "/graft.v1.ImageClassifier/Classify"
STREAM_ROUTE = "/graft.v1.ImageClassifier/ClassifyStream"


def error_response(err: GraftError, request_id: str) -> pb.ClassifyResponse:
    error = pb.Error(status=err.grpc_status.name, code=err.code, message=err.message)
    return pb.ClassifyResponse(request_id=request_id, error=error)


class ImageClassifierServicer(pb_grpc.ImageClassifierServicer):
    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway

    async def _classify(
        self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext, route: str
    ) -> pb.ClassifyResponse:
        response = await self._gateway.classify(
            list(request.images),
            model=request.model or None,
            version=request.version if request.HasField("version") else None,
            top_k=request.top_k or DEFAULT_TOP_K,
            protocol=PROTOCOL,
            deadline=deadline_of(context),
            route=route,
            client_key=client_key(context),
            reject_unknown=request.reject_unknown if request.HasField("reject_unknown") else None,
        )
        return to_proto(response, request.request_id)

    async def Classify(
        self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ClassifyResponse:
        return await guarded(context, self._classify(request, context, CLASSIFY_ROUTE))

    async def _answer(
        self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ClassifyResponse:
        try:
            return await self._classify(request, context, STREAM_ROUTE)
        except GraftError as err:
            return error_response(err, request.request_id)

    async def ClassifyStream(
        self,
        request_iterator: AsyncIterator[pb.ClassifyRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.ClassifyResponse]:
        # Read ahead and classify concurrently so one stream's requests can share a batch;
        # answer strictly in request order.
        pending: asyncio.Queue[asyncio.Task[pb.ClassifyResponse] | None] = asyncio.Queue(
            STREAM_WINDOW
        )

        async def read() -> None:
            try:
                async for request in request_iterator:
                    await pending.put(asyncio.create_task(self._answer(request, context)))
            finally:
                await pending.put(None)

        reader = asyncio.create_task(read())
        try:
            while (task := await pending.get()) is not None:
                yield await guarded(context, task)
            await reader
        finally:
            reader.cancel()
            while not pending.empty():
                if (task := pending.get_nowait()) is not None:
                    task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader

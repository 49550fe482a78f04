"""graft's gRPC API from Python: `GraftClient.grpc("host:50051")` returns one of these.

    with GraftClient.grpc("localhost:50051") as client:
        response = client.classify(["leaf.jpg"], top_k=3)      # -> schemas.ClassifyResponse

Failures raise the same `service.errors.GraftError` subclasses the server raised (the server
sends the error code in the `graft-error-code` trailer), so callers handle HTTP and gRPC alike.
"""

from collections.abc import Iterable, Iterator, Sequence
from types import TracebackType

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service import errors, schemas
from service.client.inputs import Image, read_image
from service.graft_v1 import ERROR_CODE_KEY, from_proto
from service.schemas import DEFAULT_TOP_K
from service.stubs.graft.v1 import classifier_pb2 as pb
from service.stubs.graft.v1 import classifier_pb2_grpc as pb_grpc
from service.units import MiB

# Used when the server sent no graft error code (transport failures, grpc core's own limits).
_BY_STATUS: dict[grpc.StatusCode, type[errors.GraftError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: errors.BadRequest,
    grpc.StatusCode.NOT_FOUND: errors.ModelNotFound,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.PayloadTooLarge,
    grpc.StatusCode.UNAVAILABLE: errors.NotReady,
    grpc.StatusCode.DEADLINE_EXCEEDED: errors.DeadlineExceeded,
}


def graft_error(err: grpc.RpcError) -> errors.GraftError:
    """The GraftError a failed call stands for."""
    assert isinstance(err, grpc.Call)  # every RpcError a stub raises is also a Call
    trailers = dict(err.trailing_metadata() or ())
    cls = errors.error_class(str(trailers.get(ERROR_CODE_KEY, ""))) or _BY_STATUS.get(err.code())
    return (cls or errors.GraftError)(err.details() or err.code().name)


def _request(
    images: Sequence[Image],
    model: str | None,
    version: int | None,
    top_k: int,
    request_id: str,
    reject_unknown: bool | None = None,
) -> pb.ClassifyRequest:
    return pb.ClassifyRequest(
        model=model or "",
        version=version,
        images=[read_image(image) for image in images],
        top_k=top_k,
        request_id=request_id,
        reject_unknown=reject_unknown,
    )


class GrpcClient:
    def __init__(
        self, target: str, *, timeout_s: float | None = 30.0, max_message_bytes: int = 32 * MiB
    ) -> None:
        self._timeout_s = timeout_s
        self._channel = grpc.insecure_channel(
            target,
            options=[
                ("grpc.max_send_message_length", max_message_bytes),
                ("grpc.max_receive_message_length", max_message_bytes),
            ],
        )
        self._classifier = pb_grpc.ImageClassifierStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def classify(
        self,
        images: Sequence[Image],
        *,
        model: str | None = None,
        version: int | None = None,
        top_k: int = DEFAULT_TOP_K,
        timeout_s: float | None = None,
        reject_unknown: bool | None = None,
    ) -> schemas.ClassifyResponse:
        """Classify encoded images (bytes or file paths) in one call (`reject_unknown`: as
        GraftClient.classify)."""
        request = _request(images, model, version, top_k, "", reject_unknown)
        try:
            response = self._classifier.Classify(request, timeout=timeout_s or self._timeout_s)
        except grpc.RpcError as err:
            raise graft_error(err) from None
        return from_proto(response)

    def classify_stream(
        self,
        batches: Iterable[Sequence[Image]],
        *,
        model: str | None = None,
        version: int | None = None,
        top_k: int = DEFAULT_TOP_K,
        timeout_s: float | None = None,
    ) -> Iterator[schemas.ClassifyResponse | errors.GraftError]:
        """One ClassifyStream call: one answer per batch, in order. A batch that failed yields
        its GraftError instead of raising, so the remaining batches still get answers."""
        requests = (
            _request(batch, model, version, top_k, str(index))
            for index, batch in enumerate(batches)
        )
        try:
            for response in self._classifier.ClassifyStream(requests, timeout=timeout_s):
                yield _stream_answer(response)
        except grpc.RpcError as err:
            raise graft_error(err) from None

    def ready(self, model: str | None = None, timeout_s: float = 5.0) -> bool:
        """True when the server (or `model` on it) answers health checks with SERVING."""
        request = health_pb2.HealthCheckRequest(service=model or "")
        try:
            response = self._health.Check(request, timeout=timeout_s)
        except grpc.RpcError:
            return False
        return response.status == health_pb2.HealthCheckResponse.SERVING

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "GrpcClient":
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _stream_answer(response: pb.ClassifyResponse) -> schemas.ClassifyResponse | errors.GraftError:
    if response.HasField("error"):
        return errors.error_from_code(response.error.code, response.error.message)
    return from_proto(response)

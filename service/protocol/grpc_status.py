"""What every graft gRPC servicer shares (graft.v1, TF Serving, the Open Inference Protocol's
in service/protocol/v2): GraftError -> status mapping and client deadlines."""

import logging
import time
from collections.abc import Awaitable, Iterator
from contextlib import contextmanager
from typing import NoReturn, TypeVar

import grpc

from service.errors import GraftError, Overloaded
from service.gateway.canary import CLIENT_KEY_HEADER
from service.gateway.request_metrics import rejected
from service.graft_v1 import ERROR_CODE_KEY

log = logging.getLogger(__name__)
T = TypeVar("T")

# gRPC's own retry machinery reads this trailer to back off from an overloaded server.
RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"

DEADLINE_MARGIN_S = 0.05
PROTOCOL = "grpc"


def client_key(context: grpc.aio.ServicerContext) -> str | None:
    """The `x-graft-client` metadata value that keeps a client on one side of a canary."""
    for key, value in context.invocation_metadata() or ():
        if key == CLIENT_KEY_HEADER and isinstance(value, str):
            return value
    return None


def error_trailers(err: GraftError) -> tuple[tuple[str, str], ...]:
    trailers = [(ERROR_CODE_KEY, err.code)]
    if isinstance(err, Overloaded):
        trailers.append((RETRY_PUSHBACK_KEY, str(int(err.retry_after_s * 1000))))
    return tuple(trailers)


async def abort(context: grpc.aio.ServicerContext, err: GraftError) -> NoReturn:
    await context.abort(err.grpc_status, err.message, error_trailers(err))
    raise AssertionError("unreachable: context.abort raises")  # for type checkers


async def guarded(context: grpc.aio.ServicerContext, work: Awaitable[T]) -> T:
    """Await `work`; turn a GraftError into its gRPC status, anything else into INTERNAL."""
    try:
        return await work
    except GraftError as err:
        await abort(context, err)
    except Exception:
        # The caller gets no internals; the server log gets the traceback.
        log.exception("gRPC request failed unexpectedly")
        await context.abort(grpc.StatusCode.INTERNAL, "internal error; see the graft server log")
        raise


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The client's deadline as a time.monotonic() instant, or None when it set none.

    Brought forward by DEADLINE_MARGIN_S so the Gateway gives up first and the client gets
    graft's DEADLINE_EXCEEDED with its advice, rather than a bare cancellation."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining - DEADLINE_MARGIN_S


@contextmanager
def rejecting(route: str, protocol: str = PROTOCOL) -> Iterator[None]:
    """Count a GraftError raised while parsing a request, before the Gateway saw it."""
    try:
        yield
    except GraftError as err:
        rejected(protocol, route, err)
        raise

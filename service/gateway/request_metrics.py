"""Each request's duration and outcome, and the reason of every refusal, as Prometheus series."""

import time
from collections.abc import Iterator
from contextlib import contextmanager

from service import metrics
from service.errors import GraftError

# Protocols whose outcomes are gRPC status names (OK, INVALID_ARGUMENT); the others' are HTTP
# status codes. "v2-grpc" is the Open Inference Protocol over gRPC ("v2" is its REST side).
GRPC_PROTOCOLS = frozenset({"grpc", "v2-grpc"})


@contextmanager
def observe(
    protocol: str, route: str, model: str = "", version: int | None = None
) -> Iterator[dict[str, str]]:
    """Record one request's duration and outcome (and its rejection reason, if any); the
    caller sets `outcome["version"]` once it knows the version that answered."""
    outcome = {"version": "" if version is None else str(version)}
    started = time.perf_counter()
    code = "OK" if protocol in GRPC_PROTOCOLS else "200"
    try:
        yield outcome
    except GraftError as exc:
        code = _status_code(protocol, exc)
        metrics.REQUESTS_REJECTED.labels(exc.code).inc()
        raise
    except BaseException:
        code = "INTERNAL" if protocol in GRPC_PROTOCOLS else "500"
        raise
    finally:
        metrics.REQUEST_DURATION.labels(protocol, route, model, outcome["version"], code).observe(
            time.perf_counter() - started
        )


def rejected(protocol: str, route: str, exc: GraftError) -> None:
    """Count a request refused before it reached the gateway (e.g. unparseable)."""
    metrics.REQUESTS_REJECTED.labels(exc.code).inc()
    code = _status_code(protocol, exc)
    metrics.REQUEST_DURATION.labels(protocol, route, "", "", code).observe(0)


def _status_code(protocol: str, exc: GraftError) -> str:
    return exc.grpc_status.name if protocol in GRPC_PROTOCOLS else str(exc.http_status)

"""Each request's duration and outcome, and the reason of every refusal, as Prometheus series.

Label values never come from the request as they are: every label set is a series for ever (and
a set of files in the multiprocess folder), so a model label is a model the repository holds,
a version label one of its versions, and anything else is `unknown`.
"""

import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from service import metrics
from service.errors import GraftError
from service.wire import ModelStatus

UNKNOWN = "unknown"

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
        model_label, version_label = _SERVED.labels(model, outcome["version"])
        metrics.REQUEST_DURATION.labels(protocol, route, model_label, version_label, code).observe(
            time.perf_counter() - started
        )


def rejected(protocol: str, route: str, exc: GraftError) -> None:
    """Count a request refused before it reached the gateway (e.g. unparseable)."""
    metrics.REQUESTS_REJECTED.labels(exc.code).inc()
    code = _status_code(protocol, exc)
    metrics.REQUEST_DURATION.labels(protocol, route, "", "", code).observe(0)


def _status_code(protocol: str, exc: GraftError) -> str:
    return exc.grpc_status.name if protocol in GRPC_PROTOCOLS else str(exc.http_status)


class _ServedModels:
    """The models and versions whose names may be label values (the last status seen)."""

    def __init__(self) -> None:
        self._versions: dict[str, frozenset[str]] = {}

    def update(self, statuses: Iterable[ModelStatus]) -> None:
        self._versions = {s.name: frozenset(str(v.version) for v in s.versions) for s in statuses}

    def labels(self, model: str, version: str) -> tuple[str, str]:
        versions = self._versions.get(model)
        if versions is None:
            return (UNKNOWN if model else "", UNKNOWN if version else "")
        return model, version if not version or version in versions else UNKNOWN


_SERVED = _ServedModels()


def record_served(statuses: Iterable[ModelStatus]) -> None:
    """Tell the request metrics which models and versions exist (on every status refresh)."""
    _SERVED.update(statuses)

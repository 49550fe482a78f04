"""Latency and throughput summaries of one measured load window."""

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Sample:
    """One request: when it was started (scheduled, for open loop), how long it took, outcome."""

    start: float
    latency_s: float
    error: str | None = None  # None = success; else an HTTP status or exception class
    version: int | None = None  # the model version that answered, when the protocol says


@dataclass
class Summary:
    requests: int
    errors: int
    error_kinds: dict[str, int]
    throughput_ips: float
    latency_ms: dict[str, float]
    versions: dict[str, int] = field(default_factory=dict)


def percentiles_ms(latencies_s: Sequence[float]) -> dict[str, float]:
    """p50/p95/p99/mean/max in milliseconds; NaN-free empty result for no samples."""
    if not latencies_s:
        return {
            "p50": float("nan"),
            "p95": float("nan"),
            "p99": float("nan"),
            "mean": float("nan"),
            "max": float("nan"),
        }
    ms = np.asarray(latencies_s, dtype=np.float64) * 1000.0
    p50, p95, p99 = np.percentile(ms, [50, 95, 99])
    return {
        "p50": float(p50),
        "p95": float(p95),
        "p99": float(p99),
        "mean": float(ms.mean()),
        "max": float(ms.max()),
    }


def summarize(samples: Sequence[Sample], window_start: float, window_end: float) -> Summary:
    """Requests started inside [window_start, window_end) count; throughput is successful
    images per second of the window (1 image per request)."""
    inside = [s for s in samples if window_start <= s.start < window_end]
    ok = [s for s in inside if s.error is None]
    errors = Counter(s.error for s in inside if s.error is not None)
    versions = Counter(str(s.version) for s in ok if s.version is not None)
    span = max(window_end - window_start, 1e-9)
    return Summary(
        requests=len(inside),
        errors=sum(errors.values()),
        error_kinds=dict(errors),
        throughput_ips=len(ok) / span,
        latency_ms=percentiles_ms([s.latency_s for s in ok]),
        versions=dict(versions),
    )

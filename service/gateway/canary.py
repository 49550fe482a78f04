"""The canary split: which version answers a request that names none.

The split is a pure function of the policy and either the request's client key or a request
counter, so every replica and every entry worker splits alike without talking to the others:

- a request with a client key (the `X-Graft-Client` HTTP header or gRPC metadata key) goes to
  the canary when sha256(model/canary version/key) falls in the canary's share of 10,000
  buckets: the same key always lands on the same version, and raising the percent keeps the
  clients already on the canary there;
- a request without one takes the next number of its model's counter, and request n goes to
  the canary when floor((n+1) * share) > floor(n * share): exactly `percent` % of any run of
  requests (20 % is every fifth one), on each worker, hence over all of them.

A canary is routed to only while it is AVAILABLE (loaded and warm) beside a stable version.
"""

import hashlib
from dataclasses import dataclass
from typing import Literal

from service import metrics
from service.policy import CanaryPolicy
from service.wire import ModelStatus, VersionState

CLIENT_KEY_HEADER = "x-graft-client"  # HTTP header and gRPC metadata key (lower case)
MAX_KEY_CHARS = 256  # of a client key, hashed (headers are bounded before this)
BUCKETS = 10_000  # shares in hundredths of a percent

Arm = Literal["named", "stable", "canary"]


@dataclass(frozen=True)
class Route:
    """The version a request goes to, and why."""

    version: int | None  # None: the active version (no status seen yet)
    arm: Arm  # named: the caller chose it; stable / canary: the split did
    stable: int | None = None

    def to_stable(self) -> "Route":
        return Route(self.stable, "stable", self.stable)


def share_of(percent: float) -> int:
    """`percent` (0-100) as a number of buckets out of BUCKETS."""
    return round(percent * BUCKETS / 100)


def in_share(share: int, *, key: str | None, counter: int, salt: str) -> bool:
    """Whether a request falls in `share` buckets: by its key's hash, else by its counter."""
    if key:
        text = f"{salt}\n{key[:MAX_KEY_CHARS]}".encode(errors="replace")
        return int.from_bytes(hashlib.sha256(text).digest()[:8], "big") % BUCKETS < share
    return (counter + 1) * share // BUCKETS > counter * share // BUCKETS


class Split:
    """The per-model request counters of one entry worker (models that exist: bounded)."""

    def __init__(self) -> None:
        self._counters: dict[str, int] = {}

    def route(
        self, name: str, stable: int | None, canary: CanaryPolicy | None, key: str | None
    ) -> Route:
        """Route a request naming no version: to `canary` (a servable one) or `stable`."""
        picked = False
        if canary is not None:
            counter = 0
            if not key:
                counter = self._counters.get(name, 0)
                self._counters[name] = counter + 1
            salt = f"{name}/{canary.version}"
            picked = in_share(share_of(canary.percent), key=key, counter=counter, salt=salt)
        route = Route(canary.version, "canary", stable) if picked and canary else None
        route = route or Route(stable, "stable", stable)
        if route.version is not None:
            metrics.SPLIT_REQUESTS.labels(name, str(route.version), route.arm).inc()
        return route


def servable_canary(status: ModelStatus | None) -> CanaryPolicy | None:
    """The policy's canary, if it can take requests now: loaded, and not the stable version."""
    policy = status.policy if status else None
    if status is None or policy is None or policy.canary is None:
        return None
    canary = policy.canary
    if status.active_version is None or canary.version == status.active_version:
        return None
    available = any(
        v.version == canary.version and v.state == VersionState.AVAILABLE for v in status.versions
    )
    return canary if available else None

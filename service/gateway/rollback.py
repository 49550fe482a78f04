"""Judging a canary on what its requests did: withdraw it, promote it, or let it run.

One `CanaryWatch` per model and canary (version and the time it was set) holds, over the
policy's sliding window, the canary requests (failed by the model or not), the top-1
confidence of the canary's and of the stable version's images, and the canary's OOD flags
when the version reports them. `judge` applies the policy's thresholds once `min_requests`
canary requests are in the window; the agreement with the stable version comes from a shadow
of the same version (service/gateway/shadow.py), which compares both on the same images. A
canary that crossed no threshold and has held for `auto_promote_after_s` is promoted.
"""

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

from service.policy import CanaryFigures, CanaryPolicy

MAX_ENTRIES = 100_000  # per series: a window at high traffic keeps its newest entries


class Window:
    """Values seen in the last `window_s` seconds (time.monotonic()), with their sum."""

    def __init__(self) -> None:
        self._entries: deque[tuple[float, float]] = deque()
        self._sum = 0.0

    def add(self, value: float, now: float) -> None:
        self._entries.append((now, value))
        self._sum += value
        if len(self._entries) > MAX_ENTRIES:
            self._sum -= self._entries.popleft()[1]

    def prune(self, window_s: float, now: float) -> None:
        while self._entries and self._entries[0][0] < now - window_s:
            self._sum -= self._entries.popleft()[1]

    @property
    def count(self) -> int:
        return len(self._entries)

    def mean(self) -> float | None:
        return self._sum / len(self._entries) if self._entries else None


@dataclass(frozen=True)
class Verdict:
    decision: Literal["withdrawn", "promoted"]
    reason: str


@dataclass
class CanaryWatch:
    canary: CanaryPolicy
    since: float  # time.time() the canary was set (policy.json), or first seen
    requests: Window = field(default_factory=Window)  # 1.0 = failed by the model
    confidence: Window = field(default_factory=Window)  # canary images' top-1
    stable_confidence: Window = field(default_factory=Window)  # stable images' top-1
    out_of_distribution: Window = field(default_factory=Window)  # 1.0 = flagged
    decided: bool = False

    def record_canary(self, failed: bool, confidences: list[float], ood: list[bool | None]) -> None:
        now = time.monotonic()
        self.requests.add(1.0 if failed else 0.0, now)
        for value in confidences:
            self.confidence.add(value, now)
        for flag in ood:
            if flag is not None:
                self.out_of_distribution.add(0.0 if flag else 1.0, now)

    def record_stable(self, confidences: list[float]) -> None:
        now = time.monotonic()
        for value in confidences:
            self.stable_confidence.add(value, now)

    def _prune(self) -> None:
        now = time.monotonic()
        for window in self._windows():
            window.prune(self.canary.window_s, now)

    def _windows(self) -> tuple[Window, ...]:
        return (self.requests, self.confidence, self.stable_confidence, self.out_of_distribution)

    def judge(self, agreement: tuple[int, float] | None) -> Verdict | None:
        """The decision the figures call for, if any; `agreement` is (images compared,
        share that agreed) from a shadow of this version over the window, when there is one."""
        self._prune()
        canary, enough = self.canary, self.canary.min_requests
        if self.decided or self.requests.count < enough:
            return None
        if (verdict := self._threshold_crossed(agreement)) is not None:
            return verdict
        held = time.time() - self.since
        after = canary.auto_promote_after_s
        if after is not None and held >= after:
            errors = self.requests.mean() or 0.0
            return Verdict(
                "promoted",
                f"held for {held:.0f} s (auto_promote_after_s {after:g}) with no threshold "
                f"crossed: error rate {errors:.3f} over the last {self.requests.count} canary "
                "requests",
            )
        return None

    def _threshold_crossed(self, agreement: tuple[int, float] | None) -> Verdict | None:
        reason = (
            self._errors_crossed()
            or self._confidence_crossed()
            or self._ood_crossed()
            or self._agreement_crossed(agreement)
        )
        return None if reason is None else Verdict("withdrawn", reason)

    def _errors_crossed(self) -> str | None:
        errors, limit = self.requests.mean() or 0.0, self.canary.max_error_rate
        if errors <= limit:
            return None
        return (
            f"error rate {errors:.3f} over the last {self.requests.count} canary requests "
            f"(max_error_rate {limit:g})"
        )

    def _confidence_crossed(self) -> str | None:
        enough, limit = self.canary.min_requests, self.canary.max_confidence_drop
        mine, theirs = self.confidence.mean(), self.stable_confidence.mean()
        if mine is None or theirs is None or theirs - mine <= limit:
            return None
        if self.confidence.count < enough or self.stable_confidence.count < enough:
            return None
        return (
            f"mean top-1 confidence {mine:.3f}, {theirs - mine:.3f} below the stable version's "
            f"{theirs:.3f} (max_confidence_drop {limit:g})"
        )

    def _ood_crossed(self) -> str | None:
        flagged, limit = self.out_of_distribution.mean(), self.canary.max_ood_rate
        if flagged is None or flagged <= limit:
            return None
        if self.out_of_distribution.count < self.canary.min_requests:
            return None
        return (
            f"{flagged:.3f} of its images out of distribution over the last "
            f"{self.out_of_distribution.count} (max_ood_rate {limit:g})"
        )

    def _agreement_crossed(self, agreement: tuple[int, float] | None) -> str | None:
        limit = self.canary.min_agreement
        if agreement is None or agreement[0] < self.canary.min_requests or agreement[1] >= limit:
            return None
        return (
            f"top-1 agreement {agreement[1]:.3f} with the stable version over {agreement[0]} "
            f"shadowed images (min_agreement {limit:g})"
        )

    def figures(self, agreement: tuple[int, float] | None) -> CanaryFigures:
        self._prune()
        flagged = self.out_of_distribution
        return CanaryFigures(
            version=self.canary.version,
            percent=self.canary.percent,
            requests=self.requests.count,
            errors=round((self.requests.mean() or 0.0) * self.requests.count),
            mean_confidence=self.confidence.mean(),
            stable_mean_confidence=self.stable_confidence.mean(),
            ood_rate=flagged.mean() if flagged.count else None,
            agreement=agreement[1] if agreement else None,
            held_s=round(time.time() - self.since, 3),
        )

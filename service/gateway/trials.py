"""Canary and shadow versions on live traffic: what the Gateway asks before and after inference.

- `route`: the version a request that names none goes to (service/gateway/canary.py).
- `canary_failed`: a canary request's outcome, recorded for its judgement; True when the model
  failed it, and the gateway then answers it with the stable version (the caller named no
  version, so any version that answers is a correct answer): no caller sees a canary's failure.
- `sample` / `answered`: shadow samples (service/gateway/shadow.py).
- A verdict (service/gateway/rollback.py) is written to policy.json under the model's lock, only
  if the policy still names the canary that was judged, so replicas deciding at once agree and
  the first write wins. The withdrawal takes effect in this worker at once; the others follow
  their next status poll. Where policy.json cannot be written (a read-only model volume) the
  canary stays withdrawn in this worker, and GET /models says why.
"""

import asyncio
import contextlib
import logging
import time

from service import metrics
from service.errors import GraftError, error_class
from service.gateway.backend_calls import call_backend
from service.gateway.canary import Route, Split, in_share, servable_canary, share_of
from service.gateway.rollback import CanaryWatch, Verdict
from service.gateway.shadow import Labels, Sample, ShadowRunner
from service.policy import MAX_DECISIONS, CanaryPolicy, Decision, Policy, TrafficStatus
from service.settings import GraftSettings
from service.store.promotion import promotion_of, read_promotions, record_promotion
from service.store.repository import ModelRepository
from service.wire import (
    InferenceBackend,
    InferResult,
    ModelStatus,
    Promotion,
    PromotionState,
    VersionState,
)

logger = logging.getLogger("graft.trials")

# Failures that are the canary model's fault (500s), not the image's (400s) or the load's
_LOAD_CODES = frozenset({"overloaded", "device_out_of_memory", "not_ready", "deadline_exceeded"})


class Trials:
    def __init__(
        self,
        backend: InferenceBackend,
        repository: ModelRepository,
        settings: GraftSettings,
        labels: Labels,
    ) -> None:
        self._backend = backend
        self._repository = repository
        self._timeout_s = settings.request_timeout_s
        self._split = Split()
        self._watches: dict[str, CanaryWatch] = {}
        self._policies: dict[str, Policy] = {}  # as of each model's last routed request
        self._withdrawn: dict[str, tuple[int, float | None, str]] = {}  # not in policy.json
        self._shadow_counters: dict[str, int] = {}
        self._writes: set[asyncio.Task[None]] = set()  # verdicts being written (kept alive)
        self._shadow = ShadowRunner(
            backend,
            labels,
            queue_images=settings.shadow_queue,
            timeout_s=settings.request_timeout_s,
        )

    # -- before inference ------------------------------------------------------------------

    def route(self, name: str, status: ModelStatus | None, key: str | None) -> Route:
        stable = status.active_version if status else None
        return self._split.route(name, stable, self._canary(name, status), key)

    def sample(
        self, name: str, status: ModelStatus | None, route: Route, images: list[bytes]
    ) -> Sample | None:
        """Queue a sample of a stable request for the policy's shadow version (or None)."""
        policy = status.policy if status else None
        shadow = policy.shadow if policy else None
        if shadow is None or route.arm != "stable" or shadow.version == route.version:
            return None
        counter = self._shadow_counters.get(name, 0)
        self._shadow_counters[name] = counter + 1
        if not in_share(share_of(shadow.rate * 100), key=None, counter=counter, salt=name):
            return None
        if not _available(status, shadow.version):
            self._shadow.drop(name, shadow.version, "unavailable")
            return None
        return self._shadow.offer(name, shadow, images)

    # -- after inference -------------------------------------------------------------------

    def canary_failed(self, name: str, route: Route, results: list[InferResult]) -> bool:
        """Record a canary request's outcome; True when the model failed it (retry on stable)."""
        watch = self._watches.get(name)
        if route.arm != "canary" or watch is None or watch.canary.version != route.version:
            return False
        failed = any(_model_failed(r) for r in results)
        good = [r for r in results if r.error_code is None]
        watch.record_canary(
            failed,
            [float(r.array().max()) for r in good],
            [r.in_distribution for r in good],
        )
        if failed:
            metrics.CANARY_RETRIES.labels(name, str(route.version)).inc()
        self._judge(name, watch)
        return failed and route.stable is not None

    def answered(
        self, name: str, route: Route, labels: list[str], results: list[InferResult],
        sample: Sample | None,
    ) -> None:  # fmt: skip
        """A request's successful results: the stable side of the canary's figures, and the
        stable answer its shadow sample is compared with."""
        if route.arm != "stable" or (sample is None and name not in self._watches):
            return
        rows = [r.array() for r in results]
        top = [(labels[int(row.argmax())], float(row.max())) for row in rows]
        watch = self._watches.get(name)
        if watch is not None:
            watch.record_stable([score for _, score in top])
        if sample is not None:
            sample.answered(top)

    def figures(self, status: ModelStatus) -> TrafficStatus | None:
        policy = status.policy
        if policy is None or (policy.canary is None and policy.shadow is None):
            return None
        traffic = TrafficStatus()
        if policy.shadow is not None:
            traffic.shadow = self._shadow.figures(status.name, policy.shadow)
        watch = self._watch(status.name, policy)
        if watch is not None:
            traffic.canary = watch.figures(self._agreement(status.name, policy, watch.canary))
        withdrawn = self._withdrawn.get(status.name)
        traffic.withdrawn_locally = withdrawn[2] if withdrawn else None
        return traffic

    # -- judging ---------------------------------------------------------------------------

    def _canary(self, name: str, status: ModelStatus | None) -> CanaryPolicy | None:
        """The canary requests may go to now, keeping its watch current."""
        canary = servable_canary(status)
        policy = status.policy if status else None
        if policy is not None:
            self._policies[name] = policy
        withdrawn = self._withdrawn.get(name)
        if withdrawn and (policy is None or _identity(policy) != withdrawn[:2]):
            del self._withdrawn[name]  # the policy moved on: it no longer names that canary
            withdrawn = None
        if canary is None or policy is None or withdrawn:
            return None
        watch = self._watch(name, policy)
        return canary if watch is not None and not watch.decided else None

    def _watch(self, name: str, policy: Policy) -> CanaryWatch | None:
        canary = policy.canary
        if canary is None:
            self._watches.pop(name, None)
            return None
        watch = self._watches.get(name)
        since = policy.canary_since or (watch.since if watch else time.time())
        if watch is None or watch.canary != canary or watch.since != since:
            watch = self._watches[name] = CanaryWatch(canary, since)
        return watch

    def _agreement(
        self, name: str, policy: Policy, canary: CanaryPolicy
    ) -> tuple[int, float] | None:
        shadow = policy.shadow
        if shadow is None or shadow.version != canary.version:
            return None
        return self._shadow.agreement(name, canary.version, canary.window_s)

    def _judge(self, name: str, watch: CanaryWatch) -> None:
        policy = self._policies.get(name)
        agreement = self._agreement(name, policy, watch.canary) if policy else None
        verdict = watch.judge(agreement)
        if verdict is None:
            return
        watch.decided = True
        logger.warning(
            "model %s canary version %s %s: %s", name, watch.canary.version, verdict.decision,
            verdict.reason,
        )  # fmt: skip
        since = policy.canary_since if policy else None
        if verdict.decision == "withdrawn":
            self._withdrawn[name] = (watch.canary.version, since, verdict.reason)
        write = asyncio.get_running_loop().create_task(
            self._persist(name, watch.canary, since, verdict)
        )
        self._writes.add(write)
        write.add_done_callback(self._writes.discard)

    async def _persist(
        self, name: str, canary: CanaryPolicy, since: float | None, verdict: Verdict
    ) -> None:
        """Write the verdict to policy.json (if the policy still names this canary)."""
        decided: list[bool] = []

        def change(current: Policy) -> Policy | None:
            if current.canary != canary or current.canary_since != since:
                return None  # another replica decided first, or an operator changed it
            decided.append(True)
            return _after(current, verdict)

        try:
            if verdict.decision == "promoted":
                # The record first: the stable version is the newest promoted one, and the
                # canary, still a trial until the policy drops it, is then swapped in warm.
                await asyncio.to_thread(self._promote, name, canary, since, verdict.reason)
            await asyncio.to_thread(self._repository.update_policy, name, change)
        except (GraftError, OSError) as exc:
            why = exc.message if isinstance(exc, GraftError) else str(exc)
            logger.error("model %s: the canary decision was not written: %s", name, why)
            if verdict.decision == "withdrawn":
                reason = f"{verdict.reason}; not written to policy.json ({why[:300]})"
                self._withdrawn[name] = (canary.version, since, reason)
                # a read-only model volume: this replica alone stops routing to it
                metrics.CANARY_DECISIONS.labels(
                    name, str(canary.version), "withdrawn_locally"
                ).inc()
            return
        if decided:
            metrics.CANARY_DECISIONS.labels(name, str(canary.version), verdict.decision).inc()
        with contextlib.suppress(GraftError):  # the next poll picks the policy up anyway
            await call_backend(self._backend.refresh(), time.monotonic() + self._timeout_s)

    def _promote(self, name: str, canary: CanaryPolicy, since: float | None, reason: str) -> None:
        """Record the promotion where the stable version is chosen from (the promotion
        gate's records), if the policy still names this canary: a candidate canary becomes
        promoted, its gate figures kept."""
        current = self._repository.policy(name)
        if current.canary != canary or current.canary_since != since:
            return
        version = canary.version
        before = promotion_of(read_promotions(self._repository, name), version)
        promotion = Promotion(
            state=PromotionState.PROMOTED,
            decided_by="auto",  # by the server, as the policy's auto_promote_after_s says
            reason=f"canary promoted automatically: {reason}"[:2000],
            gate=before.gate,
        )
        record_promotion(self._repository, name, version, promotion)


def _after(current: Policy, verdict: Verdict) -> Policy:
    """The policy once `verdict` is applied to its canary."""
    canary = current.canary
    assert canary is not None
    record = Decision(
        version=canary.version, decision=verdict.decision, reason=verdict.reason[:1000],
        at=time.time(),
    )  # fmt: skip
    update: dict[str, object] = {
        "canary": None,
        "canary_since": None,
        "decisions": [*current.decisions, record][-MAX_DECISIONS:],
    }
    if verdict.decision == "promoted":
        if current.pin is not None:
            update["pin"] = canary.version  # the pinned stable version is replaced by it
        if current.shadow is not None and current.shadow.version == canary.version:
            update["shadow"] = None  # it would shadow itself
    return current.model_copy(update=update)


def _identity(policy: Policy) -> tuple[int | None, float | None]:
    return (policy.canary.version if policy.canary else None, policy.canary_since)


def _available(status: ModelStatus | None, version: int) -> bool:
    return status is not None and any(
        v.version == version and v.state == VersionState.AVAILABLE for v in status.versions
    )


def _model_failed(result: InferResult) -> bool:
    """A failure of the model itself (a 500), not of the image (400) or the load (503/504)."""
    if result.error_code is None or result.error_code in _LOAD_CODES:
        return False
    error = error_class(result.error_code)
    return error is None or error.http_status >= 500

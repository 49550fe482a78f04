"""The promotion gate's decisions as Prometheus series, from the records the poller reads.

The decisions are made by whoever publishes (`graft train`, `graft publish`, `graft push`, an
operator), often a short-lived process that no Prometheus scrapes, so the serving side counts
what it sees: each poll compares every version's state with the previous poll's.

- `graft_model_promotion{model,version,state}`: 1 for the state a version is in, 0 for the
  others (versions on disk only; a deleted version's series drop to 0).
- `graft_promotions_total{model,outcome}`: recorded decisions this process saw being made
  (outcome: promoted / rejected). The states found at the first poll of a model are the
  starting point, not decisions. Every replica counts what it sees: aggregate with `max`.
"""

from service import metrics
from service.store.promotion import promotion_of
from service.wire import Promotion, PromotionState

_DECIDED = (PromotionState.PROMOTED, PromotionState.REJECTED)


class PromotionMetrics:
    """What the last poll saw of each model's promotion states."""

    def __init__(self) -> None:
        self._seen: dict[str, dict[int, PromotionState]] = {}

    def observe(self, name: str, on_disk: list[int], records: dict[int, Promotion]) -> None:
        before = self._seen.get(name)
        states = {}
        for version in on_disk:
            promotion = promotion_of(records, version)
            states[version] = promotion.state
            if before is not None and before.get(version) == promotion.state:
                continue
            _set_state(name, version, promotion.state)
            recorded = promotion.decided_by != "unrecorded"
            if before is not None and recorded and promotion.state in _DECIDED:
                metrics.PROMOTIONS.labels(name, promotion.state.value).inc()
        for version in (before or {}).keys() - states.keys():  # deleted
            _set_state(name, version, None)
        self._seen[name] = states


def _set_state(name: str, version: int, state: PromotionState | None) -> None:
    for each in PromotionState:
        metrics.PROMOTION_STATE.labels(name, str(version), each.value).set(int(each == state))

"""The canary's rules without a server: the split is exact and a pure function of the key or
the counter, the verdicts follow the policy's thresholds, and policy.json round-trips through
the repository (a real folder) with the pin-only form unchanged."""

import json
import time
from pathlib import Path

import pytest

from service.errors import BadRequest
from service.gateway.canary import Split, in_share, share_of
from service.gateway.policy_check import check_policy
from service.gateway.rollback import CanaryWatch
from service.policy import CanaryPolicy, Policy, PolicyBody
from service.store.repository import ModelRepository, RepositoryError
from service.wire import ModelStatus, VersionState, VersionStatus


@pytest.mark.parametrize("percent", [0, 1, 5, 20, 33.33, 50, 99.99, 100])
def test_the_counter_split_is_exact_over_any_run_of_requests(percent: float) -> None:
    picks = [in_share(share_of(percent), key=None, counter=n, salt="m/2") for n in range(10_000)]
    assert sum(picks) == round(percent * 100)
    # every window of 100 requests holds the share within one request
    for start in range(0, 9_900, 700):
        assert abs(sum(picks[start : start + 100]) - percent) <= 1


def test_a_key_always_lands_alike_and_a_larger_share_keeps_its_clients() -> None:
    keys = [f"client-{i}" for i in range(2_000)]
    at_10 = {k for k in keys if in_share(share_of(10), key=k, counter=0, salt="m/2")}
    at_30 = {k for k in keys if in_share(share_of(30), key=k, counter=7, salt="m/2")}
    assert at_10 <= at_30, "raising the percent must not move a canary client back"
    assert 150 < len(at_10) < 250 and 500 < len(at_30) < 700
    again = {k for k in keys if in_share(share_of(10), key=k, counter=99, salt="m/2")}
    assert again == at_10, "a keyed request ignores the counter"
    other = {k for k in keys if in_share(share_of(10), key=k, counter=0, salt="m/3")}
    assert other != at_10, "another canary version draws its own clients"


def test_two_workers_split_alike_from_their_own_counters() -> None:
    canary = CanaryPolicy(version=2, percent=25)
    first, second = Split(), Split()
    one = [first.route("m", 1, canary, None).version for _ in range(40)]
    two = [second.route("m", 1, canary, None).version for _ in range(40)]
    assert one == two and one.count(2) == 10
    assert first.route("m", 1, None, "k").version == 1, "no canary: the stable answers"


def _watch(**settings: float) -> CanaryWatch:
    return CanaryWatch(CanaryPolicy(version=2, percent=50, min_requests=4, **settings), time.time())


def test_the_error_rate_withdraws_only_past_min_requests_and_the_threshold() -> None:
    watch = _watch(max_error_rate=0.25)
    for failed in (True, False, False):
        watch.record_canary(failed, [0.9], [None])
    assert watch.judge(None) is None, "3 requests: under min_requests"
    watch.record_canary(False, [0.9], [None])
    assert watch.judge(None) is None, "1 of 4 failed: at the threshold, not past it"
    watch.record_canary(True, [], [])
    verdict = watch.judge(None)
    assert verdict is not None and verdict.decision == "withdrawn"
    assert "error rate 0.400 over the last 5 canary requests" in verdict.reason


def test_confidence_ood_and_agreement_withdraw_a_canary() -> None:
    drop = _watch(max_confidence_drop=0.1)
    for _ in range(4):
        drop.record_canary(False, [0.5], [None])
        drop.record_stable([0.9])
    assert "below the stable version's 0.900" in drop.judge(None).reason  # type: ignore[union-attr]
    ood = _watch(max_ood_rate=0.5)
    for flag in (False, False, False, True):
        ood.record_canary(False, [0.9], [flag])
    assert "out of distribution" in ood.judge(None).reason  # type: ignore[union-attr]
    agreeing = _watch(min_agreement=0.8)
    for _ in range(4):
        agreeing.record_canary(False, [0.9], [True])
    assert agreeing.judge((3, 0.1)) is None, "too few shadowed images to judge"
    assert "top-1 agreement 0.500" in agreeing.judge((10, 0.5)).reason  # type: ignore[union-attr]


def test_a_canary_that_held_is_promoted_and_the_window_forgets_old_failures() -> None:
    watch = CanaryWatch(
        CanaryPolicy(version=2, percent=50, min_requests=2, auto_promote_after_s=5),
        since=time.time() - 10,
    )
    for _ in range(2):
        watch.record_canary(False, [0.9], [None])
    verdict = watch.judge(None)
    assert verdict is not None and verdict.decision == "promoted"
    old = _watch(window_s=0.05, max_error_rate=0.0)
    for _ in range(4):
        old.record_canary(True, [], [])
    time.sleep(0.1)
    assert old.judge(None) is None, "failures older than the window no longer count"


def _status(active: int, failed: int | None = None) -> ModelStatus:
    versions = [VersionStatus(version=v, state=VersionState.AVAILABLE) for v in (1, 2)]
    if failed is not None:
        versions.append(VersionStatus(version=failed, state=VersionState.FAILED, reason="hash"))
    return ModelStatus(
        name="m", active_version=active, previous_version=None, pin=None, versions=versions
    )


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"canary": {"version": 4, "percent": 5}}, "canary.version"),
        ({"canary": {"version": 1, "percent": 5}}, "canary.version: version 1 is the stable"),
        ({"shadow": {"version": 3, "rate": 1}}, "shadow.version: version 3 FAILED"),
        ({"pin": 2, "shadow": {"version": 2, "rate": 1}}, "shadow.version: version 2 is the"),
    ],
)
def test_policy_check_names_the_field(body: dict, field: str) -> None:
    with pytest.raises(BadRequest, match=field):
        check_policy("m", PolicyBody.model_validate(body), _status(1, 3), [1, 2, 3], {})
    check_policy("m", PolicyBody(canary=CanaryPolicy(version=2, percent=5)), _status(1), [1, 2], {})


def test_policy_json_round_trips_and_replicas_never_undo_each_other(tmp_path: Path) -> None:
    repository = ModelRepository(tmp_path)
    (tmp_path / "m" / "1").mkdir(parents=True)
    (tmp_path / "m" / "1" / "graft.json").write_text("{}")  # a version, as versions() sees it
    repository.set_pin("m", None)
    assert json.loads((tmp_path / "m" / "policy.json").read_text()) == {"pin": None}
    canary = CanaryPolicy(version=2, percent=20)
    repository.update_policy("m", lambda p: p.model_copy(update={"canary": canary}))
    assert repository.policy("m").canary == canary
    repository.set_pin("m", 1)
    assert repository.policy("m").canary == canary, "a pin keeps the rest of the policy"

    def withdraw(current: Policy) -> Policy | None:  # what each replica's verdict does
        if current.canary != canary:
            return None
        return current.model_copy(update={"canary": None})

    assert repository.update_policy("m", withdraw).canary is None
    before = (tmp_path / "m" / "policy.json").read_bytes()
    assert repository.update_policy("m", withdraw).canary is None
    assert (tmp_path / "m" / "policy.json").read_bytes() == before, "the second one wrote nothing"
    (tmp_path / "m" / "policy.json").write_text('{"pin": null, "canary": {"version": 2}}')
    with pytest.raises(RepositoryError, match=r"policy\.json is not a serving policy"):
        repository.policy("m")

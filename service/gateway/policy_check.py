"""A new policy checked against the model it is for, before it is written.

The body's own shape (types, ranges, unknown fields) is pydantic's (service/policy.py); this
checks what needs the repository and the model's state: that the canary and shadow versions
exist, can serve (not FAILED, not REJECTED by the promotion gate) and are not the stable
version. Every refusal is a 400 whose message starts with the field it is about; the policy in
force is left as it was.
"""

from service.errors import BadRequest
from service.policy import PolicyBody
from service.wire import ModelStatus, Promotion, PromotionState, VersionState


def check_policy(
    name: str,
    body: PolicyBody,
    status: ModelStatus | None,
    on_disk: list[int],
    promotions: dict[int, Promotion],
) -> None:
    """Raise BadRequest naming the field when `body` cannot be served as it says. The pin
    itself was checked by the caller (404 for a missing version, as before)."""
    stable = body.pin if body.pin is not None else (status.active_version if status else None)
    trials = (("canary", body.canary), ("shadow", body.shadow))
    for field, trial in trials:
        if trial is None:
            continue
        where = f"{field}.version"
        _check_servable(name, where, trial.version, status, on_disk)
        if stable is None:
            raise BadRequest(
                f"{field}: model {name!r} has no stable version serving yet to compare it with; "
                "wait until one is loaded (GET /models), or pin one"
            )
        if trial.version == stable:
            raise BadRequest(
                f"{where}: version {trial.version} is the stable version (it answers the "
                f"requests that name none); a {field} must be another version"
            )
    if body.canary is not None:
        record = promotions.get(body.canary.version)
        if record is not None and record.state == PromotionState.REJECTED:
            raise BadRequest(
                f"canary.version: version {body.canary.version} was rejected by the promotion "
                f"gate ({record.reason[:300]}); a rejected version serves only when an "
                "operator pins it on purpose"
            )


def _check_servable(
    name: str, where: str, version: int, status: ModelStatus | None, on_disk: list[int]
) -> None:
    if version not in on_disk:
        listing = ", ".join(map(str, on_disk)) or "none"
        raise BadRequest(f"{where}: model {name!r} has no version {version} (versions: {listing})")
    states = {v.version: v for v in status.versions} if status else {}
    known = states.get(version)
    if known is not None and known.state == VersionState.FAILED:
        raise BadRequest(
            f"{where}: version {version} FAILED to load ({(known.reason or '')[:300]}); it "
            "cannot serve: publish a fixed version"
        )

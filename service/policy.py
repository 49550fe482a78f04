"""A model's serving policy (MODEL_ROOT/<name>/policy.json) and what the gateway measured under it.

Plain data, shared by the store (which reads and writes the file), the version manager (which
keeps every version the policy names loaded) and the gateway (which splits, shadows and
withdraws or promotes canaries). Every replica reads the same file, so they all split alike.

    {"pin": null,
     "canary": {"version": 3, "percent": 20, "window_s": 60, "min_requests": 20,
                "max_error_rate": 0.05, "min_agreement": 0.8, "max_ood_rate": 0.3,
                "max_confidence_drop": 0.15, "auto_promote_after_s": 3600},
     "shadow": {"version": 3, "rate": 0.1},
     "reject_unknown": false,
     "canary_since": 1764640000.0,          written by the server when a canary is set
     "decisions": [{"version": 2, "decision": "withdrawn", "reason": "...", "at": ...}]}

`PolicyBody` is what `PUT /models/{name}/policy` takes (unknown fields refused); `Policy` adds
the fields only the server writes.
"""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_VERSION = 10**18 - 1  # as the routes' version parameters
MAX_DECISIONS = 20  # decisions kept in policy.json, newest last
_DAY_S = 86_400.0

_STRICT = ConfigDict(extra="forbid", strict=True)


class CanaryPolicy(BaseModel):
    """`percent` % of the requests that name no version go to `version`; the thresholds
    withdraw it, `auto_promote_after_s` promotes one that held."""

    model_config = _STRICT

    version: int = Field(ge=1, le=MAX_VERSION)
    percent: float = Field(ge=0, le=100, description="Share of unversioned requests, 0-100.")
    window_s: float = Field(60.0, gt=0, le=_DAY_S, description="Seconds the figures cover.")
    min_requests: int = Field(
        20, ge=1, le=1_000_000, description="Canary requests in the window before any decision."
    )
    max_error_rate: float = Field(
        0.05, ge=0, le=1, description="Canary requests failed by the model, over the window."
    )
    min_agreement: float = Field(
        0.8,
        ge=0,
        le=1,
        description="Top-1 agreement with the stable version; judged only while a shadow of "
        "the same version compares it on live traffic.",
    )
    max_ood_rate: float = Field(
        0.3,
        ge=0,
        le=1,
        description="Images the canary flags out of distribution; judged only for a version "
        "that reports it.",
    )
    max_confidence_drop: float = Field(
        0.15,
        ge=0,
        le=1,
        description="How far the canary's mean top-1 confidence may fall below the stable "
        "version's over the window.",
    )
    auto_promote_after_s: float | None = Field(
        None,
        gt=0,
        le=30 * _DAY_S,
        description="Promote the canary once it has held this long (null: never).",
    )


class ShadowPolicy(BaseModel):
    """A share (`rate`) of the stable version's requests is also run on `version`, off the
    request path, to compare top-1 answers and confidences."""

    model_config = _STRICT

    version: int = Field(ge=1, le=MAX_VERSION)
    rate: float = Field(gt=0, le=1, description="Share of stable requests also run, (0, 1].")


class PolicyBody(BaseModel):
    """The policy a client sets. PUT replaces the whole policy: a field left out is reset."""

    model_config = ConfigDict(**_STRICT, json_schema_extra={"minProperties": 1})

    pin: int | None = Field(None, ge=1, le=MAX_VERSION)
    canary: CanaryPolicy | None = None
    shadow: ShadowPolicy | None = None
    reject_unknown: bool = False


class Decision(BaseModel):
    """A canary withdrawn or promoted by the server, with why."""

    model_config = _STRICT

    version: int
    decision: Literal["withdrawn", "promoted"]
    reason: str
    at: float  # time.time()


class Policy(PolicyBody):
    """policy.json as stored: the client's fields and the server's record."""

    model_config = ConfigDict(**_STRICT, json_schema_extra=None)

    canary_since: float | None = None  # time.time() when the canary was set
    decisions: list[Decision] = Field(default_factory=list)

    def trial_versions(self) -> list[int]:
        """The versions this policy serves beside the stable one (canary, shadow)."""
        named = [t.version for t in (self.canary, self.shadow) if t is not None]
        return sorted(set(named))

    def withdrawn_versions(self) -> set[int]:
        """Versions whose last decision was a withdrawal: never stable unless pinned (a
        version published before the promotion gate counts as promoted, so without this a
        withdrawn canary that is the newest version would become the stable one)."""
        last = {d.version: d.decision for d in self.decisions}
        return {v for v, decision in last.items() if decision == "withdrawn"}


class PolicyAnswer(Policy):
    """PUT /models/{name}/policy's answer: the policy now in force, and the model's name."""

    name: str


# -- what the gateway measured (GET /models) ------------------------------------------------


class CanaryFigures(BaseModel):
    version: int
    percent: float
    requests: int = 0  # canary requests in the window
    errors: int = 0  # of them, failed by the model (each answered by the stable version)
    mean_confidence: float | None = None
    stable_mean_confidence: float | None = None
    ood_rate: float | None = None  # None: the version reports no OOD flag
    agreement: float | None = None  # from a shadow of the same version, when there is one
    held_s: float | None = None  # since the canary was set


class ShadowFigures(BaseModel):
    version: int
    rate: float
    compared: int = 0  # images both versions answered
    agreement: float | None = None  # share of those images with the same top-1 label
    mean_confidence: float | None = None
    stable_mean_confidence: float | None = None
    errors: int = 0  # shadow requests the shadow version failed (the caller never sees them)
    dropped: dict[str, int] = Field(default_factory=dict)  # by reason: queue_full, busy, ...


class TrafficStatus(BaseModel):
    """The canary and shadow figures of the entry worker that answered GET /models."""

    canary: CanaryFigures | None = None
    shadow: ShadowFigures | None = None
    withdrawn_locally: str | None = None  # a withdrawal that could not be written to policy.json

"""The contract between the entry side and the inference side: what crosses the process boundary.

The entry side (protocols, gateway) sends `InferItem`s and reads `InferResult`s, model states
and metadata through an `InferenceBackend`; the inference side (service.runtime) produces them.
Everything here is plain data (pydantic, JSON-safe), so it crosses a socket or stays in-process
unchanged, and nothing here imports TensorFlow.
"""

import math
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal, Protocol

import numpy as np
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from service.policy import Policy, TrafficStatus


class InferItem(BaseModel):
    """One image of one request. `version` None means the model's active version."""

    model_config = ConfigDict(ser_json_bytes="base64", val_json_bytes="base64")

    model: str
    version: int | None = None
    image: bytes
    enqueued_at: float  # time.time() in the gateway, for the queue-wait metric
    protocol: str = ""  # who asked (http / grpc), for the batch-mix metric
    # The request answers `unknown` for this image if it is out of distribution: counted so in
    # graft_predictions_total (the gateway sets the answer's label).
    reject_unknown: bool = False
    explain: bool = False  # also the heatmap of the top-1 class (the `explain` signature)
    # Shadow work: runs only while no caller's image waits (service.runtime.batcher).
    background: bool = False


class InferResult(BaseModel):
    """Probabilities of one item (float32 bytes, C values), or the error it raised."""

    model_config = ConfigDict(ser_json_bytes="base64", val_json_bytes="base64")

    model: str
    version: int | None = None
    probabilities: bytes | None = None
    error_code: str | None = None
    error: str | None = None
    heatmap: bytes | None = None  # explained items: float32 [s, s] in [0, 1], row-major
    # Versions with the out-of-distribution outputs (graft.json `ood`); None for older ones.
    ood_score: float | None = None  # higher = further from the training images
    in_distribution: bool | None = None  # ood_score <= the version's threshold

    def array(self) -> np.ndarray:
        return np.frombuffer(self.probabilities or b"", dtype=np.float32)

    def heatmap_array(self) -> np.ndarray:
        """The heatmap as float32 [s, s] (it is square: the model's image size)."""
        values = np.frombuffer(self.heatmap or b"", dtype=np.float32)
        side = math.isqrt(len(values))
        return values.reshape(side, side)


class ModelMetadata(BaseModel):
    name: str
    version: int
    labels: list[str]
    image_size: int
    signatures: dict[str, Any]
    runtime: str = "tensorflow"
    device: str = "cpu"


class VersionState(StrEnum):
    AVAILABLE = "AVAILABLE"  # loaded and warm: active or previous
    LOADING = "LOADING"
    FAILED = "FAILED"
    UNLOADED = "UNLOADED"  # on disk, not in memory (older than previous)


class PromotionState(StrEnum):
    """Whether a version may serve requests that name no version (the promotion gate)."""

    CANDIDATE = "candidate"  # published, not decided: served only when pinned
    PROMOTED = "promoted"  # may be the stable version
    REJECTED = "rejected"  # the gate found it worse: kept on disk, served only when pinned


def _not_a_bool(value: object) -> object:
    """JSON Schema's numbers: `true` is not 1, while 3.0 is the integer 3."""
    if isinstance(value, bool):
        raise ValueError("a number is expected, not true or false")
    return value


_NUMBER = BeforeValidator(_not_a_bool)  # after the range, so the OpenAPI schema keeps it
_SHARE = Annotated[float, Field(ge=0, le=1), _NUMBER]


class GateFigures(BaseModel):
    """One version's figures on the gate's held-out images."""

    version: Annotated[int, Field(ge=1, le=10**18 - 1), _NUMBER] | None = None
    accuracy: _SHARE
    macro_f1: _SHARE


class GateResult(BaseModel):
    """What the promotion gate measured: the candidate and the active version on the same images."""

    source: str = Field(max_length=256, description="'test split' or 'gate data <folder>'")
    images: Annotated[int, Field(ge=1, le=10**9), _NUMBER]
    chance: _SHARE = Field(description="Share of the largest class: always guessing it.")
    max_regression: _SHARE
    candidate: GateFigures
    active: GateFigures | None = Field(None, description="None: no version was active.")
    active_measured_by: str | None = Field(
        None, max_length=64, description="'local' (the version's files) or 'server' (/classify)"
    )


class Promotion(BaseModel):
    """A version's promotion record (service/store/promotion.py)."""

    state: PromotionState
    # auto: a canary the server promoted after auto_promote_after_s (service/gateway/trials.py)
    decided_by: Literal["gate", "always", "never", "operator", "auto", "unrecorded"]
    reason: str = Field(max_length=2000)
    decided_at: datetime | None = None
    gate: GateResult | None = None


class PromotionBody(BaseModel):
    """PUT /models/{name}/versions/{version}/promotion's body: the decision to record (the
    server stamps `decided_at`)."""

    state: PromotionState
    decided_by: Literal["gate", "never", "operator"] = Field(
        "operator",
        description="operator: keeps the gate's figures already recorded; a version promoted "
        "at once is pushed with promote=always instead",
    )
    reason: str = Field("", max_length=2000, description="Empty: the server words one.")
    gate: GateResult | None = None


class PromotionAnswer(Promotion):
    """The promotion PUT's answer: the version's record now in force, and whose it is."""

    name: str
    version: int


class VersionStatus(BaseModel):
    version: int
    state: VersionState
    reason: str | None = None
    runtime: str | None = None  # AVAILABLE versions: what runs the network (tensorflow, ...)
    device: str | None = None  # AVAILABLE versions: where it runs (cpu, gpu:0, ...)
    runtime_note: str | None = None  # why it is not the runtime GRAFT_RUNTIME asked for
    promotion: Promotion | None = None  # the promotion gate's record (None: not read)


class ModelStatus(BaseModel):
    name: str
    active_version: int | None
    previous_version: int | None
    pin: int | None
    versions: list[VersionStatus]
    policy: Policy | None = None  # policy.json as the version manager last read it
    traffic: TrafficStatus | None = None  # the gateway's canary and shadow figures


class InferenceBackend(Protocol):
    """The inference service as the gateway sees it (a BentoML dependency in production)."""

    async def infer(self, items: list[InferItem]) -> list[InferResult]: ...
    async def status(self) -> list[ModelStatus]: ...
    async def metadata(self, model: str, version: int) -> ModelMetadata: ...
    async def refresh(self) -> None: ...
    async def check_model(self, folder: str, name: str) -> None: ...

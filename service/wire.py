"""The contract between the entry side and the inference side: what crosses the process boundary.

The entry side (protocols, gateway) sends `InferItem`s and reads `InferResult`s, model states
and metadata through an `InferenceBackend`; the inference side (service.runtime) produces them.
Everything here is plain data (pydantic, JSON-safe), so it crosses a socket or stays in-process
unchanged, and nothing here imports TensorFlow.
"""

from enum import StrEnum
from typing import Any, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict


class InferItem(BaseModel):
    """One image of one request. `version` None means the model's active version."""

    model_config = ConfigDict(ser_json_bytes="base64", val_json_bytes="base64")

    model: str
    version: int | None = None
    image: bytes
    enqueued_at: float  # time.time() in the gateway, for the queue-wait metric
    protocol: str = ""  # who asked (http / grpc), for the batch-mix metric


class InferResult(BaseModel):
    """Probabilities of one item (float32 bytes, C values), or the error it raised."""

    model_config = ConfigDict(ser_json_bytes="base64", val_json_bytes="base64")

    model: str
    version: int | None = None
    probabilities: bytes | None = None
    error_code: str | None = None
    error: str | None = None

    def array(self) -> np.ndarray:
        return np.frombuffer(self.probabilities or b"", dtype=np.float32)


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


class VersionStatus(BaseModel):
    version: int
    state: VersionState
    reason: str | None = None
    runtime: str | None = None  # AVAILABLE versions: what runs the network (tensorflow, ...)
    device: str | None = None  # AVAILABLE versions: where it runs (cpu, gpu:0, ...)
    runtime_note: str | None = None  # why it is not the runtime GRAFT_RUNTIME asked for


class ModelStatus(BaseModel):
    name: str
    active_version: int | None
    previous_version: int | None
    pin: int | None
    versions: list[VersionStatus]


class InferenceBackend(Protocol):
    """The inference service as the gateway sees it (a BentoML dependency in production)."""

    async def infer(self, items: list[InferItem]) -> list[InferResult]: ...
    async def status(self) -> list[ModelStatus]: ...
    async def metadata(self, model: str, version: int) -> ModelMetadata: ...
    async def refresh(self) -> None: ...
    async def check_model(self, folder: str, name: str) -> None: ...

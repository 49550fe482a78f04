"""What the Open Inference Protocol's REST and gRPC sides share above the tensors: server and
model metadata, readiness, and resolving the model and version a request names.

A request's model and version are checked against the repository (the Gateway's cached model
states, refreshed once on a miss) before anything is recorded under them, so a metric label is
always a model and version that exist, never a string from the request.
"""

import time
from dataclasses import dataclass

from service import __version__
from service.errors import BadRequest, ModelNotFound
from service.gateway import Gateway
from service.gateway.backend_calls import call_backend
from service.protocol.decimal_text import decimal
from service.protocol.v2.tensors import INPUTS, TensorMeta, output_metadata
from service.store.layout import OOD_OUTPUTS, SERVING_SIGNATURE
from service.store.repository import validate_name
from service.wire import ModelStatus, VersionState

SERVER_NAME = "graft"
SERVER_VERSION = __version__
EXTENSIONS = ("binary_tensor_data",)
# What runs the network, in Triton's platform names (its model configuration's `platform`).
PLATFORMS = {
    "tensorflow": "tensorflow_savedmodel",
    "onnxruntime": "onnxruntime_onnx",
    "openvino": "openvino",
}


@dataclass(frozen=True)
class ModelRef:
    """A model and version that exist in the repository (version None: the active one)."""

    name: str
    version: int | None
    status: ModelStatus

    def available(self) -> list[int]:
        return [v.version for v in self.status.versions if v.state == VersionState.AVAILABLE]


@dataclass(frozen=True)
class ModelMeta:
    name: str
    version: int  # the version described: the requested one, or the active one
    versions: list[str]
    platform: str
    inputs: tuple[TensorMeta, ...]
    outputs: tuple[TensorMeta, ...]


def parse_version(text: str) -> int | None:
    """The protocol's version string -> graft's integer version ("" : the active one)."""
    if text == "":
        return None
    number = decimal(text)
    if number is None or number < 1:
        raise BadRequest(
            f"model version {text[:40]!r} is not a version: graft versions are positive "
            "integers (1, 2, ...); leave it out for the active version"
        )
    return number


async def resolve(gateway: Gateway, name: str, version: str) -> ModelRef:
    """The model and version a request names, or ModelNotFound / BadRequest saying why."""
    name = validate_name(name)
    number = parse_version(version)
    status = gateway.model_status(name)
    if status is None or not _has(status, number):
        # Published since the last poll? A backend that does not answer is a 503, not a 500.
        deadline = time.monotonic() + gateway.settings.request_timeout_s
        await call_backend(gateway.refresh_status(), deadline)
        status = gateway.model_status(name)
    if status is None:
        raise ModelNotFound(
            f"model {name!r} does not exist in the repository; check the name (each model "
            "is a folder under the server's model root)"
        )
    if not _has(status, number):
        versions = [v.version for v in status.versions]
        raise ModelNotFound(f"model {name!r} has no version {number} (versions: {versions})")
    return ModelRef(name, number, status)


def _has(status: ModelStatus, version: int | None) -> bool:
    return version is None or any(v.version == version for v in status.versions)


def model_ready(gateway: Gateway, model: ModelRef) -> bool:
    if not gateway.ready(model.name):  # no warm version yet, or the server is draining
        return False
    return model.version is None or model.version in model.available()


async def model_metadata(gateway: Gateway, model: ModelRef) -> ModelMeta:
    """Raises NotReady while the model has no warm version."""
    metadata = await gateway.metadata(model.name, model.version)
    return ModelMeta(
        name=model.name,
        version=metadata.version,
        versions=[str(version) for version in model.available()],
        platform=PLATFORMS.get(metadata.runtime, metadata.runtime),
        inputs=INPUTS,
        outputs=output_metadata(len(metadata.labels), _has_ood(metadata.signatures)),
    )


def _has_ood(signatures: dict) -> bool:
    """Whether the version's serving_default outputs the out-of-distribution score and flag."""
    outputs = signatures.get(SERVING_SIGNATURE, {}).get("outputs", {})
    return all(name in outputs for name in OOD_OUTPUTS)

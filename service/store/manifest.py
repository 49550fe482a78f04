"""graft.json: what a model version is, and the sha256 of every file in it.

Deliberately free of TensorFlow: the repository, the version manager's poller and the kill -9
tests read and verify manifests in processes that never load a model.
"""

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, StringConstraints, ValidationError, field_validator

from service.errors import RejectedModel, validation_message
from service.store.durable import write_durably
from service.store.layout import (
    LABELS_FILE,
    MANIFEST_FILE,
    ONNX_FILE,
    SAVED_MODEL_FILE,
    SIGNATURES,
)

_CHUNK = 1 << 20

# Bounds on what a graft.json may say, checked before anything loads the version: it comes
# from a push or from whoever writes the volume, and is not hashed (it holds the hashes).
# image_size: every backbone's native size is 224; 1024 leaves room for fine-tuning larger
# while one image's float32 input stays 12 MiB (30000 would be 10 GiB before the network).
MAX_IMAGE_SIZE = 1024
# labels: each is a value of graft_predictions_total's label label; ImageNet has 1000.
MAX_LABELS = 10_000
MAX_LABEL_CHARS = 128
MAX_METRICS_BYTES = 64 * 1024  # evaluation figures and a confusion matrix of a few classes
MAX_FILES = 10_000
MAX_MANIFEST_BYTES = 4 * 1024 * 1024  # 10,000 labels of 128 characters and 10,000 hashes fit
_MAX_LABELS_FILE_BYTES = MAX_LABELS * (4 * MAX_LABEL_CHARS + 1)  # UTF-8, one per line

_Short = Annotated[str, StringConstraints(max_length=128)]
_Label = Annotated[str, StringConstraints(min_length=1, max_length=MAX_LABEL_CHARS)]
_Path = Annotated[str, StringConstraints(min_length=1, max_length=1024)]
_Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]


class ManifestError(RejectedModel):
    """A version folder whose files do not match its manifest (or that has no valid one)."""

    code = "invalid_manifest"


class Accelerated(BaseModel):
    """The network exported for an accelerated runtime, beside the SavedModel."""

    format: Literal["onnx"] = "onnx"
    file: Literal["onnx/model.onnx"] = ONNX_FILE
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    converter: str = Field(max_length=64, description="e.g. 'tf2onnx 1.17.0'")
    opset: int = Field(ge=1, le=1000)


class Ood(BaseModel):
    """The out-of-distribution flag baked into the version's outputs (training/ood.py)."""

    method: str = Field(max_length=32, description="e.g. 'mahalanobis'")
    threshold: float = Field(allow_inf_nan=False, description="in_distribution = score <= it")
    percentile: float = Field(gt=0, le=100, description="of the validation images' scores")


class Manifest(BaseModel):
    """The content of graft.json. `name` and `version` stay None in an export's draft and are
    filled in by `ModelRepository.publish`."""

    name: str | None = Field(None, max_length=63)
    version: int | None = Field(None, ge=1, le=10**18 - 1)
    backbone: str = Field(max_length=64)
    image_size: int = Field(gt=0, le=MAX_IMAGE_SIZE)
    labels: list[_Label] = Field(min_length=1, max_length=MAX_LABELS)
    metrics: dict[str, Any] = Field(default_factory=dict)
    dataset_fingerprint: str | None = Field(None, max_length=128)
    framework: dict[_Short, _Short] = Field(default_factory=dict, max_length=32)
    signatures: list[_Short] = Field(default_factory=lambda: list(SIGNATURES), max_length=16)
    accelerated: Accelerated | None = Field(
        None, description="Absent: the version runs on TensorFlow only (exports before 0.2)."
    )
    ood: Ood | None = Field(
        None, description="Absent: the version has no out-of-distribution outputs (older)."
    )
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    files: dict[_Path, _Sha256] = Field(
        default_factory=dict,
        max_length=MAX_FILES,
        description="Relative POSIX path -> sha256 of every other file.",
    )

    @field_validator("metrics")
    @classmethod
    def _metrics_are_small(cls, metrics: dict[str, Any]) -> dict[str, Any]:
        size = len(json.dumps(metrics, default=str))
        if size > MAX_METRICS_BYTES:
            raise ValueError(f"metrics take {size} bytes of JSON, over {MAX_METRICS_BYTES}")
        return metrics

    @classmethod
    def read(cls, folder: Path) -> "Manifest":
        path = folder / MANIFEST_FILE
        try:
            return cls.model_validate_json(_read_bounded(path, MAX_MANIFEST_BYTES))
        except FileNotFoundError:
            raise ManifestError(
                f"{folder} has no {MANIFEST_FILE}; it is not a graft export"
            ) from None
        except ValidationError as exc:
            raise ManifestError(
                f"{path} is invalid: {validation_message(exc, 'document')}"
            ) from None

    def write(self, folder: Path) -> None:
        """Write graft.json durably: a temporary file, fsync, then rename over the old one."""
        text = json.dumps(self.model_dump(mode="json"), indent=2, ensure_ascii=False) + "\n"
        write_durably(folder / MANIFEST_FILE, text.encode())


def _read_bounded(path: Path, limit: int) -> bytes:
    """The file's bytes; ManifestError when it is over `limit` (nothing more is read)."""
    with path.open("rb") as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise ManifestError(f"{path} is over {limit} bytes; it cannot be a graft manifest")
    return data


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def hash_tree(folder: Path) -> dict[str, str]:
    """sha256 of every regular file under `folder` except graft.json itself.

    A symlink or special file anywhere is an error: a version must be self-contained, and a
    link could point outside the model repository.
    """
    hashes: dict[str, str] = {}
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder).as_posix()
        if path.is_symlink() or not (path.is_file() or path.is_dir()):
            raise ManifestError(f"{folder}: {relative} is a link or special file")
        if path.is_file() and relative != MANIFEST_FILE:
            hashes[relative] = sha256_file(path)
    return hashes


def verify_dir(folder: Path, *, name: str | None = None, version: int | None = None) -> Manifest:
    """Check that `folder` holds exactly the files its manifest lists, with those hashes.

    `name` / `version`, when given, must match the manifest (a version folder renamed or copied
    by hand is caught here).
    """
    manifest = Manifest.read(folder)
    if name is not None and manifest.name != name:
        raise ManifestError(f"{folder}: manifest names model {manifest.name!r}, not {name!r}")
    if version is not None and manifest.version != version:
        raise ManifestError(f"{folder}: manifest says version {manifest.version}, not {version}")
    _compare_files(folder, manifest.files, hash_tree(folder))
    _check_labels_file(folder, manifest.labels)
    _check_accelerated(folder, manifest)
    return manifest


def _compare_files(folder: Path, expected: dict[str, str], actual: dict[str, str]) -> None:
    missing = sorted(expected.keys() - actual.keys())
    extra = sorted(actual.keys() - expected.keys())
    changed = sorted(p for p in expected.keys() & actual.keys() if expected[p] != actual[p])
    problems = [
        f"{label}: {', '.join(paths[:5])}"
        for label, paths in (("missing", missing), ("not in manifest", extra), ("changed", changed))
        if paths
    ]
    if problems:
        raise ManifestError(f"{folder} does not match its manifest ({'; '.join(problems)})")
    if SAVED_MODEL_FILE not in expected:
        raise ManifestError(f"{folder} has no {SAVED_MODEL_FILE}; it is not a SavedModel")


def _check_labels_file(folder: Path, labels: list[str]) -> None:
    try:
        text = _read_bounded(folder / LABELS_FILE, _MAX_LABELS_FILE_BYTES)
        on_disk = text.decode("utf-8").splitlines()
    except FileNotFoundError:
        raise ManifestError(f"{folder} has no {LABELS_FILE}") from None
    except UnicodeDecodeError:
        raise ManifestError(f"{folder}: {LABELS_FILE} is not UTF-8 text") from None
    if on_disk != labels:
        raise ManifestError(f"{folder}: {LABELS_FILE} disagrees with the labels in the manifest")


def _check_accelerated(folder: Path, manifest: Manifest) -> None:
    accelerated = manifest.accelerated
    if accelerated is not None and manifest.files.get(accelerated.file) != accelerated.sha256:
        raise ManifestError(
            f"{folder}: the accelerated file {accelerated.file} is not listed with the sha256 "
            "the manifest gives it; re-export the version"
        )

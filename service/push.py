"""Accepting a model push (a tar.gz of an export) as what it is: deploying code.

A push reaches the repository only after four gates, cheapest first, and every refusal is a
RejectedModel (422) that names the reason; nothing is published until all pass, so the serving
version is never touched by a rejected push.

1. Archive: gzip only, compressed size, member count and total uncompressed size capped while
   streaming (a gzip bomb stops at the cap). Each member is checked before a byte of it is
   written: no absolute paths, no `..`, no links, devices or fifos, no duplicates, and only
   the SavedModel layout below. Files are written by this module (O_EXCL | O_NOFOLLOW, mode
   0644), never by `tarfile.extract`, so no tar metadata (owners, modes, times) is trusted.
2. Manifest: graft.json is read (pydantic, JSON only) and the sha256 of every file is checked
   against it before any other file is opened as anything but bytes.
3. Content: no Keras `Lambda` layer configs (they carry marshalled Python bytecode that Keras
   would execute when loading).
4. Model (optional, needs TensorFlow): the caller's `check_model`, e.g. `validate_export`,
   which refuses graphs using file-system or Python ops and then loads the SavedModel through
   the serving runtime: signature shapes, label count == output width, finite softmax warm-up.

Layout (what `training.export.export_model` writes), at the archive root or under one folder:
    saved_model.pb  fingerprint.pb  graft.json  assets/labels.txt
    variables/variables.index  variables/variables.data-NNNNN-of-NNNNN
Make one with `pack_export(export_dir)` or `tar -C EXPORT_DIR -czf model.tar.gz .`.
"""

import errno
import io
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from service.errors import GraftError, InsufficientStorage, RejectedModel
from service.manifest import MANIFEST_FILE, Manifest, ManifestError, verify_dir
from service.repository import ModelRepository, validate_name
from service.settings import GraftSettings

MiB = 1024 * 1024
_ALLOWED_DIRS = {"variables", "assets"}
_ALLOWED_FILES = re.compile(
    r"^(saved_model\.pb|fingerprint\.pb|graft\.json|assets/labels\.txt|variables/variables\.index"
    r"|variables/variables\.data-[0-9]{5}-of-[0-9]{5})$"
)
_REQUIRED = ("saved_model.pb", MANIFEST_FILE, "assets/labels.txt", "variables/variables.index")
_MAX_MANIFEST_BYTES = 4 * MiB
_KERAS_LAMBDA = re.compile(rb'"class_name"\s*:\s*"(?:[\w.]*\.)?Lambda"')
_CHUNK = MiB
# Ops that touch the file system, the network or the Python interpreter. A graft export needs
# none of them in its serving functions (SaveV2/RestoreV2 stay: every SavedModel's checkpoint
# functions use them). Defence in depth only: the admin token is the real boundary.
DENIED_OPS = frozenset(
    {
        "ReadFile", "WriteFile", "MatchingFiles", "ImmutableConst",
        "PyFunc", "PyFuncStateless", "EagerPyFunc",
        "Print", "PrintV2", "DebugIdentity", "DebugIdentityV2", "DebugIdentityV3",
        "DebugNanCount", "DebugNumericSummary", "DebugNumericSummaryV2",
        "Save", "SaveSlices", "Restore", "RestoreSlice",
        "CreateSummaryFileWriter", "CreateSummaryDbWriter", "WriteSummary", "WriteRawProtoSummary",
        "WriteScalarSummary", "WriteHistogramSummary", "WriteImageSummary", "WriteAudioSummary",
        "WriteGraphSummary", "ImportEvent",
        "TFRecordDataset", "TFRecordDatasetV2", "FixedLengthRecordDataset",
        "FixedLengthRecordDatasetV2", "TextLineDataset", "SqlDataset", "ExperimentalSqlDataset",
        "LMDBDataset", "ExperimentalLMDBDataset", "SaveDataset", "SaveDatasetV2", "LoadDataset",
        "SnapshotDataset", "SnapshotDatasetV2", "DatasetToTFRecord",
        "ExperimentalDatasetToTFRecord",
        "TFRecordReader", "TFRecordReaderV2", "TextLineReader", "TextLineReaderV2",
        "WholeFileReader", "WholeFileReaderV2", "FixedLengthRecordReader",
        "FixedLengthRecordReaderV2", "LMDBReader", "RecordInput",
        "RegisterDataset", "DataServiceDataset", "DataServiceDatasetV2",
        "DataServiceDatasetV3", "DataServiceDatasetV4",
        "_Send", "_Recv", "_HostSend", "_HostRecv",
    }
)  # fmt: skip

ModelCheck = Callable[[Path, str], None]


@dataclass(frozen=True)
class PushLimits:
    max_compressed_bytes: int = 512 * MiB
    max_uncompressed_bytes: int = 2048 * MiB
    max_members: int = 64

    @classmethod
    def from_settings(cls, settings: GraftSettings) -> "PushLimits":
        return cls(
            max_compressed_bytes=settings.max_push_bytes,
            max_uncompressed_bytes=settings.max_push_uncompressed_bytes,
            max_members=settings.max_push_members,
        )


def receive_push(
    source: BinaryIO | bytes,
    *,
    name: str,
    repository: ModelRepository,
    limits: PushLimits,
    check_model: ModelCheck | None = None,
) -> int:
    """Check a pushed tar.gz end to end and publish it as the next version of `name`."""
    validate_name(name)
    if isinstance(source, bytes) and len(source) > limits.max_compressed_bytes:
        raise _too_large(limits.max_compressed_bytes)
    stream = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        with repository.scratch() as scratch:
            export_dir = scratch / "export"
            extract_archive(stream, export_dir, limits)
            check_export(export_dir)
            if check_model is not None:
                check_model(export_dir, name)
            return repository.publish(export_dir, name)
    except OSError as error:
        if error.errno in _DISK_FULL:
            raise InsufficientStorage(
                f"no space left to store the model ({error.strerror}); nothing was published: "
                "free space under the model root, then push again"
            ) from None
        raise


def extract_archive(stream: BinaryIO, target: Path, limits: PushLimits) -> None:
    """Stream-extract a gzip tar into the empty folder `target`, refusing anything unexpected."""
    target.mkdir(parents=True)
    counted = _CappedReader(stream, limits.max_compressed_bytes)
    try:
        with tarfile.open(fileobj=counted, mode="r|gz") as archive:
            _extract_members(archive, target, limits)
    except GraftError:
        raise
    except (tarfile.TarError, EOFError, zlib.error, OSError, UnicodeError) as error:
        if isinstance(error, OSError) and error.errno in _DISK_FULL:
            raise  # our disk, not the caller's archive
        raise RejectedModel(
            f"the upload is not a valid tar.gz ({error}); make one with "
            "`tar -C EXPORT_DIR -czf model.tar.gz .`"
        ) from None


def check_export(folder: Path) -> Manifest:
    """Layout, manifest hashes and content checks on an extracted export (no TensorFlow)."""
    missing = [path for path in _REQUIRED if not (folder / path).is_file()]
    if not any((folder / "variables").glob("variables.data-*")):
        missing.append("variables/variables.data-*")
    if missing:
        raise RejectedModel(
            f"the export lacks {', '.join(missing)}; push the folder `graft train` exported"
        )
    if (folder / MANIFEST_FILE).stat().st_size > _MAX_MANIFEST_BYTES:
        raise RejectedModel(f"{MANIFEST_FILE} is over {_MAX_MANIFEST_BYTES // MiB} MiB")
    try:
        manifest = verify_dir(folder)  # hashes every file against graft.json, then the labels
    except ManifestError as error:
        raise RejectedModel(f"manifest check failed: {error.message}") from None
    _refuse_keras_lambda(folder)
    return manifest


def validate_export(folder: Path, name: str) -> None:
    """The TensorFlow gate: denied ops, then the serving runtime's own load + warm-up checks.

    Loads the model in this process: run it where TensorFlow already lives.
    """
    refuse_denied_ops(folder / "saved_model.pb")
    from service.runtime import LoadedModel  # TensorFlow: only when a push is checked

    # Beside the export, i.e. inside a push's scratch folder: what a killed check leaves goes too.
    with tempfile.TemporaryDirectory(prefix=".check-", dir=folder.parent) as scratch:
        trial = ModelRepository(scratch)
        version = trial.publish(folder, name)
        LoadedModel.load(trial, name, version)


def check_in_subprocess(folder: Path, name: str, *, timeout_s: float = 300.0) -> None:
    """`validate_export` in a throwaway Python process.

    The serving entry process never imports TensorFlow for a push, and a hostile or broken
    model can crash or hang only that child: either way the push is refused, never the server.
    """
    command = [sys.executable, "-m", "service.push", str(folder), name]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise RejectedModel(f"the model check did not finish within {timeout_s:g} s") from None
    if done.returncode == _EXIT_REJECTED:
        raise RejectedModel(done.stdout.strip() or "the model check refused the model")
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        raise RejectedModel(f"loading the model crashed the check process: {last}")


def refuse_denied_ops(saved_model_pb: Path) -> None:
    """Refuse a SavedModel whose graph or function library uses any op in DENIED_OPS."""
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    try:
        proto.ParseFromString(saved_model_pb.read_bytes())
    except Exception as error:  # protobuf's DecodeError has no stable import path
        raise RejectedModel(f"saved_model.pb is not a SavedModel protobuf ({error})") from None
    used = {
        node.op
        for graph in proto.meta_graphs
        for nodes in (
            graph.graph_def.node,
            *(function.node_def for function in graph.graph_def.library.function),
        )
        for node in nodes
    }
    denied = sorted(used & DENIED_OPS)
    if denied:
        raise RejectedModel(
            f"the graph uses ops graft does not serve: {', '.join(denied)} (they reach the file "
            "system, network or Python); export with training.export.export_model"
        )


def pack_export(export_dir: Path) -> bytes:
    """An export folder as the tar.gz a push expects (regular files, archive-root layout)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for path in sorted(export_dir.rglob("*")):
            if path.is_file() and not path.is_symlink():
                archive.add(path, arcname=path.relative_to(export_dir).as_posix())
    return buffer.getvalue()


# -- archive members ---------------------------------------------------------------------------


def _extract_members(archive: tarfile.TarFile, target: Path, limits: PushLimits) -> None:
    seen: set[str] = set()
    total = 0
    prefix: str | None = None
    for count, member in enumerate(_members(archive), start=1):
        if count > limits.max_members:
            raise RejectedModel(f"the archive has more than {limits.max_members} members")
        path = _safe_path(member)
        if prefix is None:
            prefix = _layout_prefix(path, member)
        relative = _strip_prefix(path, prefix)
        if member.isdir():
            _make_dir(target, relative)
            continue
        if relative in seen:  # a later copy would silently replace a checked one
            raise RejectedModel(f"{member.name!r} appears twice in the archive")
        seen.add(relative)
        total += member.size
        if total > limits.max_uncompressed_bytes:
            raise RejectedModel(
                f"the archive unpacks to more than {limits.max_uncompressed_bytes // MiB} MiB"
            )
        _write_file(archive, member, target, relative)


def _members(archive: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    while (member := archive.next()) is not None:
        yield member


def _safe_path(member: tarfile.TarInfo) -> PurePosixPath:
    name = member.name
    if member.issym() or member.islnk():
        raise RejectedModel(f"{name!r} is a link (to {member.linkname!r}); links are refused")
    if not (member.isfile() or member.isdir()) or member.issparse():
        raise RejectedModel(f"{name!r} is a device, fifo or other special file; refused")
    if "\\" in name or any(ord(ch) < 32 for ch in name):
        raise RejectedModel(f"{name!r} has a backslash or control character in its name")
    path = PurePosixPath(name)
    if path.is_absolute():
        raise RejectedModel(f"{name!r} is an absolute path; archive paths must be relative")
    if ".." in path.parts:
        raise RejectedModel(f"{name!r} climbs out of the archive with '..'")
    return path


def _layout_prefix(path: PurePosixPath, member: tarfile.TarInfo) -> str:
    """'' for an archive-root layout, or the one folder the export was archived under."""
    parts = [part for part in path.parts if part != "."]
    nested = len(parts) >= 2 or (member.isdir() and len(parts) == 1)
    return parts[0] if nested and parts[0] not in _ALLOWED_DIRS else ""


def _strip_prefix(path: PurePosixPath, prefix: str) -> str:
    parts = [part for part in path.parts if part != "."]
    if prefix:
        if not parts or parts[0] != prefix:
            raise RejectedModel(f"{path.as_posix()!r} is outside the export folder {prefix!r}")
        parts = parts[1:]
    return "/".join(parts)


def _make_dir(target: Path, relative: str) -> None:
    if relative and relative not in _ALLOWED_DIRS:
        raise RejectedModel(f"unexpected folder {relative!r}; {_LAYOUT_HINT}")
    (target / relative).mkdir(exist_ok=True)


def _write_file(
    archive: tarfile.TarFile, member: tarfile.TarInfo, target: Path, relative: str
) -> None:
    if not _ALLOWED_FILES.match(relative):
        raise RejectedModel(f"unexpected file {relative!r}; {_LAYOUT_HINT}")
    destination = target / relative
    destination.parent.mkdir(exist_ok=True)
    source = archive.extractfile(member)
    assert source is not None  # regular files always have a payload
    fd = os.open(destination, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "wb") as out:
        while chunk := source.read(_CHUNK):
            out.write(chunk)


_EXIT_REJECTED = 3
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_LAYOUT_HINT = (
    "a push holds only saved_model.pb, fingerprint.pb, graft.json, assets/labels.txt and "
    "variables/variables.{index,data-*} (no .h5, .keras, .pkl or other files)"
)


def _refuse_keras_lambda(folder: Path) -> None:
    for path in (folder / "saved_model.pb", folder / MANIFEST_FILE):
        if _KERAS_LAMBDA.search(path.read_bytes()):
            raise RejectedModel(
                f"{path.name} contains a Keras Lambda layer config; Lambda layers carry Python "
                "bytecode and are refused. Replace them with built-in or registered layers."
            )


class _CappedReader:
    """A read-only stream that refuses to deliver more than `limit` bytes of its source."""

    def __init__(self, source: BinaryIO, limit: int) -> None:
        self._source, self._limit, self._seen = source, limit, 0

    def read(self, size: int = -1) -> bytes:
        chunk = self._source.read(size)
        self._seen += len(chunk)
        if self._seen > self._limit:
            raise _too_large(self._limit)
        return chunk


def _too_large(limit: int) -> RejectedModel:
    return RejectedModel(
        f"the upload is over {limit // MiB} MiB (GRAFT_MAX_PUSH_BYTES); raise the limit if "
        "your exports really are that large"
    )


def _main(argv: list[str]) -> int:
    """`python -m service.push EXPORT_DIR NAME`: the child side of `check_in_subprocess`."""
    folder, name = argv
    try:
        validate_export(Path(folder), name)
    except RejectedModel as error:
        print(error.message)
        return _EXIT_REJECTED
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))

"""A pushed tar.gz, unpacked as what it may be: an attack.

gzip only; compressed size, member count and total uncompressed size are capped while
streaming (a gzip bomb stops at the cap). Each member is checked before a byte of it is
written: no absolute paths, no `..`, no links, devices or fifos, no duplicates, and only the
SavedModel layout below. Tar's own extension headers are bounded before tarfile reads them:
a pax or GNU long-name/long-link header over 64 KiB, more than 8 of them in a row, or an old
GNU sparse header is refused from its 512-byte header block (tarfile would otherwise read a
pax header of any size into memory, and recurse once per chained header). Files are written
by this module (O_EXCL | O_NOFOLLOW, mode 0644), never by `tarfile.extract`, so no tar
metadata (owners, modes, times) is trusted.

Layout (what `training.export.export_model` writes), at the archive root or under one folder:
    saved_model.pb  fingerprint.pb  graft.json  assets/labels.txt
    variables/variables.index  variables/variables.data-NNNNN-of-NNNNN
    onnx/model.onnx   (when exported with the accelerated network)
Make one with `pack_export(export_dir)` or `tar -C EXPORT_DIR -czf model.tar.gz .`.
"""

import errno
import io
import os
import re
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from service.errors import GraftError, RejectedModel
from service.settings import GraftSettings
from service.store.layout import (
    LABELS_FILE,
    MANIFEST_FILE,
    ONNX_FILE,
    SAVED_MODEL_FILE,
    VARIABLES_INDEX_FILE,
)
from service.units import MiB

_ALLOWED_DIRS = {"variables", "assets", str(PurePosixPath(ONNX_FILE).parent)}
_ALLOWED_FILES = re.compile(
    rf"^({re.escape(SAVED_MODEL_FILE)}|fingerprint\.pb|{re.escape(MANIFEST_FILE)}"
    rf"|{re.escape(LABELS_FILE)}|{re.escape(VARIABLES_INDEX_FILE)}|{re.escape(ONNX_FILE)}"
    r"|variables/variables\.data-[0-9]{5}-of-[0-9]{5})$"
)
_CHUNK = MiB
# Headers that describe the next member rather than being one; tarfile reads each one's whole
# payload into memory and then recurses for the next header.
_EXTENSION_TYPES = {
    tarfile.XHDTYPE: "pax",
    tarfile.SOLARIS_XHDTYPE: "pax",
    tarfile.XGLTYPE: "pax global",
    tarfile.GNUTYPE_LONGNAME: "GNU long-name",
    tarfile.GNUTYPE_LONGLINK: "GNU long-link",
}
_MAX_EXTENSION_BYTES = 64 * 1024  # a graft export's names and pax records are short
_MAX_EXTENSION_CHAIN = 8  # pax global + pax + long name + long link is 4
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_LAYOUT_HINT = (
    "a push holds only saved_model.pb, fingerprint.pb, graft.json, assets/labels.txt, "
    "variables/variables.{index,data-*} and onnx/model.onnx (no .h5, .keras, .pkl or other "
    "files)"
)


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


def extract_archive(stream: BinaryIO, target: Path, limits: PushLimits) -> None:
    """Stream-extract a gzip tar into the empty folder `target`, refusing anything unexpected."""
    target.mkdir(parents=True)
    counted = _CappedReader(stream, limits.max_compressed_bytes)
    try:
        with tarfile.open(fileobj=counted, mode="r|gz", tarinfo=_guarded_tarinfo()) as archive:
            _extract_members(archive, target, limits)
    except GraftError:
        raise
    # ValueError: tarfile's parsers raise it on malformed numbers (e.g. a GNU sparse map).
    except (tarfile.TarError, EOFError, zlib.error, OSError, UnicodeError, ValueError) as error:
        if isinstance(error, OSError) and error.errno in DISK_FULL:
            raise  # our disk, not the caller's archive
        raise RejectedModel(
            f"the upload is not a valid tar.gz ({error}); make one with "
            "`tar -C EXPORT_DIR -czf model.tar.gz .`"
        ) from None


def _guarded_tarinfo() -> type[tarfile.TarInfo]:
    """A TarInfo class for one extraction whose `frombuf` (which tarfile calls on every raw
    512-byte header, before it reads what the header announces) refuses oversized or chained
    extension headers. Its chain count is per extraction, so concurrent pushes don't share it."""
    chain = 0

    class GuardedTarInfo(tarfile.TarInfo):
        @classmethod
        def frombuf(cls, buf: bytes, encoding: str, errors: str) -> tarfile.TarInfo:
            nonlocal chain
            info = super().frombuf(buf, encoding, errors)
            if info.type == tarfile.GNUTYPE_SPARSE:  # its extension blocks are read unbounded
                raise RejectedModel(f"{info.name!r} is a sparse file; refused")
            if info.type not in _EXTENSION_TYPES:
                chain = 0
                return info
            chain += 1
            kind = _EXTENSION_TYPES[info.type]
            if info.size > _MAX_EXTENSION_BYTES:
                raise RejectedModel(
                    f"the archive has a {info.size}-byte tar {kind} header (the limit is "
                    f"{_MAX_EXTENSION_BYTES // 1024} KiB); make the archive with "
                    "`tar -C EXPORT_DIR -czf model.tar.gz .`"
                )
            if chain > _MAX_EXTENSION_CHAIN:
                raise RejectedModel(
                    f"the archive has more than {_MAX_EXTENSION_CHAIN} tar extension headers "
                    f"(pax or GNU long-name) in a row, the latest a {kind} header; a valid "
                    "archive has at most a few before each member"
                )
            return info

    return GuardedTarInfo


def pack_export(export_dir: Path) -> bytes:
    """An export folder as the tar.gz a push expects (regular files, archive-root layout)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for path in sorted(export_dir.rglob("*")):
            if path.is_file() and not path.is_symlink():
                archive.add(path, arcname=path.relative_to(export_dir).as_posix())
    return buffer.getvalue()


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


class _CappedReader:
    """A read-only stream that refuses to deliver more than `limit` bytes of its source."""

    def __init__(self, source: BinaryIO, limit: int) -> None:
        self._source, self._limit, self._seen = source, limit, 0

    def read(self, size: int = -1) -> bytes:
        chunk = self._source.read(size)
        self._seen += len(chunk)
        if self._seen > self._limit:
            raise too_large(self._limit)
        return chunk


def too_large(limit: int) -> RejectedModel:
    return RejectedModel(
        f"the upload is over {limit // MiB} MiB (GRAFT_MAX_PUSH_BYTES); raise the limit if "
        "your exports really are that large"
    )

"""What loading each version did, kept across restarts of the process that loads them.

A version that fails to load is FAILED and never retried (published versions are immutable).
Kept only in memory, FAILED was forgotten by every restart, and a version that kills the
process while it loads (the OOM killer, a crash inside TensorFlow) was loaded again by each
restarted process: a crash loop. So the loader writes a record before each load:

    STATE/<model>/<version>.json    {"attempts": N, "failed": null | "<reason>"}

- before a load: attempts + 1, written durably;
- after a load that raised: `failed` = the reason: FAILED from then on, across restarts;
- after a load that succeeded: the record is removed.

A record left with attempts >= CRASHED_ATTEMPTS and no reason means the process died that
many times while loading the version: it is FAILED too. One unfinished attempt is retried once,
since a stop in the middle of a load (SIGTERM, a node drained) leaves the same trace.

STATE is GRAFT_STATE_DIR, by default MODEL_ROOT/.state/<hostname> (a dot name: no model). The
hostname keeps replicas on a shared volume apart: each counts its own attempts. A pod's
hostname survives its container's restarts, and so does an emptyDir mounted as GRAFT_STATE_DIR
when the model volume is read-only (k8s/). Deleting a record lets the next start load the
version again. When STATE cannot be written (a read-only mount and no GRAFT_STATE_DIR), the
failures live in memory only, with one warning.
"""

import json
import logging
import re
import socket
from pathlib import Path

from service.store.durable import write_durably
from service.store.layout import MANIFEST_FILE
from service.store.repository import ModelRepository, validate_name, validate_version

STATE_DIR = ".state"
CRASHED_ATTEMPTS = 2
_MAX_RECORD_BYTES = 64 * 1024  # a record is a few dozen bytes; a larger file is not ours
_MAX_REASON_CHARS = 2000
_RECORD_NAME = re.compile(r"^[1-9][0-9]{0,17}$")  # a version number, as the repository's

logger = logging.getLogger("graft.store")


def default_state_dir(repository: ModelRepository) -> Path | None:
    """MODEL_ROOT/.state/<hostname>; None (keep nothing) when the root is one version's files
    (single-model mode), which graft never writes into."""
    if (repository.root / MANIFEST_FILE).is_file():
        return None
    return repository.root / STATE_DIR / socket.gethostname()


class LoadRecords:
    """The load records of one process, in `folder` (None: nothing is kept)."""

    def __init__(self, folder: Path | None) -> None:
        self.folder = None if folder is None else Path(folder)
        self._warned = False

    def failures(self, name: str) -> dict[int, str]:
        """The versions of `name` that failed to load, or crashed the loader, with why."""
        if self.folder is None:
            return {}
        model = self.folder / validate_name(name)
        if not model.is_dir():
            return {}
        failed = {}
        for path in sorted(model.glob("*.json")):
            version, record = _read(path)
            if version is None:
                continue
            if record.get("failed"):
                failed[version] = str(record["failed"])
            elif record.get("attempts", 0) >= CRASHED_ATTEMPTS:
                failed[version] = (
                    f"the serving process died {record['attempts']} times while loading this "
                    "version (killed for memory, or a crash inside the model's runtime); it is "
                    f"not loaded again: fix or delete the version, or delete {path} to retry"
                )
        return failed

    def started(self, name: str, version: int) -> None:
        if self.folder is None:
            return
        record = self._record(name, version)
        attempts = record.get("attempts", 0)
        self._write(name, version, {"attempts": attempts + 1, "failed": None})

    def failed(self, name: str, version: int, reason: str) -> None:
        if self.folder is None:
            return
        record = self._record(name, version)
        reason = reason[:_MAX_REASON_CHARS]
        self._write(name, version, {"attempts": record.get("attempts", 1), "failed": reason})

    def loaded(self, name: str, version: int) -> None:
        if self.folder is None:
            return
        try:
            self._path(name, version).unlink(missing_ok=True)
        except OSError as exc:
            self._warn(exc)

    def _record(self, name: str, version: int) -> dict:
        return _read(self._path(name, version))[1]

    def _write(self, name: str, version: int, record: dict) -> None:
        path = self._path(name, version)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_durably(path, json.dumps(record).encode() + b"\n")
        except OSError as exc:
            self._warn(exc)

    def _path(self, name: str, version: int) -> Path:
        assert self.folder is not None
        return self.folder / validate_name(name) / f"{validate_version(version)}.json"

    def _warn(self, exc: OSError) -> None:
        if not self._warned:
            self._warned = True
            logger.warning(
                "cannot keep load records in %s (%s): a version that fails to load, or crashes "
                "the process while loading, is loaded again after a restart. Set "
                "GRAFT_STATE_DIR to a writable folder.",
                self.folder,
                exc,
            )


def _read(path: Path) -> tuple[int | None, dict]:
    """(version, record) of a record file; (None, {}) when absent or not a record."""
    version = int(path.stem) if _RECORD_NAME.match(path.stem) else None
    try:
        with path.open("rb") as handle:
            record = json.loads(handle.read(_MAX_RECORD_BYTES + 1))
    except FileNotFoundError:
        return None, {}
    except (OSError, ValueError) as exc:  # unreadable or not JSON: a record we never wrote
        logger.warning("ignoring the load record %s: %s", path, exc)
        return None, {}
    if version is None or not isinstance(record, dict):
        return None, {}
    attempts = record.get("attempts")
    if isinstance(attempts, bool) or not isinstance(attempts, int):
        record["attempts"] = 0
    return version, record

"""The model repository: ROOT/<name>/<version>/ (TensorFlow Serving's layout) + policy.json.

Publishing is crash-safe: files are copied into ROOT/<name>/.staging-<uuid>, fsynced, hashed
into graft.json, verified, and only then renamed to the version number. rename() is atomic, so
a reader (or a publisher killed with SIGKILL at any instant) sees either no new version or a
complete one. Everything that changes a model's folder holds an exclusive flock on
ROOT/<name>/.lock, so concurrent publishers get distinct versions and any .staging-* entry found
while holding the lock belongs to a dead publisher and is removed. Pushes unpack and check their
upload in ROOT/.scratch/<uuid>, each owned through a flock on ROOT/.scratch/<uuid>.lock, so the
leftovers of a killed push are found (their lock is free) and removed by the next one.

A version number is never reused, even after its folder is deleted: the gateway caches metadata
per (name, version) and the version manager matches its previous model by number, so a number
clients know must keep meaning the same model. ROOT/<name>/.last-version (a dot name: no model,
no version) records the highest number ever handed out. Publish numbers the new version
max(mark, newest folder) + 1 and writes the mark durably (write_durably: a torn mark is never
seen) under the lock, before the rename: a kill -9 in between skips a number, never reuses one.
A repository made before the mark existed has none and is numbered from its folders; the next
publish writes it. A mark that is unreadable or not a version number is also read as absent,
with a warning naming it (numbers above the newest folder may then come round again, which is
what the warning says), and the next publish replaces it.

No TensorFlow here: this module runs in light processes (the CLI, the poller, kill -9 tests).
"""

import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from service.errors import BadRequest, GraftError, ModelNotFound
from service.policy import Policy
from service.store.durable import fsync_dir, write_durably
from service.store.layout import MANIFEST_FILE, SAVED_MODEL_FILE
from service.store.manifest import Manifest, ManifestError, verify_dir

NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_VERSION_PATTERN = re.compile(r"^[1-9][0-9]{0,17}$")
STAGING_PREFIX = ".staging-"
POLICY_FILE = "policy.json"
LOCK_FILE = ".lock"
LAST_VERSION_FILE = ".last-version"  # the high-water mark; neither a model nor a version name
SCRATCH_DIR = ".scratch"  # not a model name: NAME_PATTERN refuses the dot
_CHUNK = 1 << 20
_SHOWN_NAME = 80  # of an invalid name, in the error: a request may send megabytes

logger = logging.getLogger("graft.store")


class RepositoryError(GraftError):
    """The repository itself is in a state graft cannot use (e.g. a hand-edited policy.json)."""

    code = "repository_error"


class ModelRepository:
    """One model root on a local or shared (NFS, PVC) filesystem."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    # -- reading ---------------------------------------------------------------------------

    def models(self) -> list[str]:
        """Names of the models that have at least one complete version."""
        if not self.root.is_dir():
            return []
        names = (e.name for e in os.scandir(self.root) if e.is_dir(follow_symlinks=False))
        return sorted(n for n in names if NAME_PATTERN.match(n) and self.versions(n))

    def versions(self, name: str) -> list[int]:
        """Complete versions (a graft.json is present), ascending."""
        model_dir = self._model_dir(name)
        return sorted(
            v for v in _version_numbers(model_dir) if (model_dir / str(v) / MANIFEST_FILE).is_file()
        )

    def version_dir(self, name: str, version: int) -> Path:
        return self._inside_root(self._model_dir(name) / str(validate_version(version)))

    def verify(self, name: str, version: int) -> Manifest:
        """Hash every file of the version against its manifest; raises ManifestError."""
        return verify_dir(self._existing_version_dir(name, version), name=name, version=version)

    def pin(self, name: str) -> int | None:
        return self.policy(name).pin

    def policy(self, name: str) -> Policy:
        """policy.json of `name` (the default policy when there is none); RepositoryError
        when it is not a policy (hand-edited)."""
        path = self._model_dir(name) / POLICY_FILE
        try:
            return Policy.model_validate(json.loads(path.read_bytes()))
        except FileNotFoundError:
            return Policy()
        except (ValueError, TypeError) as exc:  # pydantic's ValidationError is a ValueError
            raise RepositoryError(
                f"{path} is not a serving policy ({str(exc).splitlines()[0][:200]}); fix it, "
                'or set it again with PUT /models/<name>/policy (e.g. {"pin": null})'
            ) from None

    def resolve(self, name: str, version: int | None = None) -> int:
        """The version a request gets: the explicit one, else the pinned one, else the newest."""
        available = self.versions(name)
        if version is not None:
            version = validate_version(version)
            if version not in available:
                raise ModelNotFound(f"model {name!r} has no version {version}{_listing(available)}")
            return version
        pinned = self.pin(name)
        if pinned is not None:
            if pinned not in available:
                raise ModelNotFound(
                    f"model {name!r} is pinned to version {pinned}, which does not exist; "
                    f"unpin it or pin an existing version{_listing(available)}"
                )
            return pinned
        if not available:
            raise ModelNotFound(f"model {name!r} has no versions under {self.root}")
        return available[-1]

    # -- writing ---------------------------------------------------------------------------

    @contextmanager
    def scratch(self) -> Iterator[Path]:
        """An empty working folder on the repository's own filesystem, removed on exit.

        The leftovers of processes killed inside theirs are removed first. Being on the same
        filesystem, a full disk shows up here, before anything is published.
        """
        parent = self.root / SCRATCH_DIR
        if parent.is_symlink() or (parent.exists() and not parent.is_dir()):
            raise RepositoryError(
                f"{parent} is not a folder; remove it (graft keeps push scratch space there)"
            )
        parent.mkdir(parents=True, exist_ok=True)
        _remove_orphaned_scratch(parent)
        folder = parent / uuid.uuid4().hex
        lock = folder.with_suffix(".lock")
        fd = _owned_lock(lock)
        try:
            folder.mkdir()
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)
            lock.unlink(missing_ok=True)
            os.close(fd)

    def scratch_folders(self) -> list[Path]:
        """Scratch folders and locks present now: those of running pushes, or leftovers."""
        parent = self.root / SCRATCH_DIR
        return sorted(parent.iterdir()) if parent.is_dir() else []

    def publish(
        self,
        export_dir: Path | str,
        name: str,
        *,
        before_rename: Callable[[int], None] | None = None,
    ) -> int:
        """Copy an export into the repository as the next version of `name`; returns it.

        `before_rename(version)` runs under the lock once the number is taken and before the
        version appears (the promotion gate records a candidate there, so that no poller ever
        sees the version without its record).
        """
        validate_name(name)
        source = Path(export_dir)
        draft = read_export(source)
        model_dir = self._model_dir(name, create=True)
        with self._locked(model_dir):
            version = max(_version_numbers(model_dir), default=0) + 1
            version = max(version, _last_version(model_dir) + 1)
            staging = model_dir / f"{STAGING_PREFIX}{uuid.uuid4().hex}"
            try:
                files = _copy_tree(source, staging)
                manifest = draft.model_copy(
                    update={"name": name, "version": version, "files": files}
                )
                manifest.write(staging)
                verify_dir(staging, name=name, version=version)
                # Last before the rename, so a refused export costs no number; a crash between
                # the two skips `version`, and nothing can reuse it.
                write_durably(model_dir / LAST_VERSION_FILE, f"{version}\n".encode())
                if before_rename is not None:
                    before_rename(version)
                os.rename(staging, model_dir / str(version))
                fsync_dir(model_dir)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
        return version

    def set_pin(self, name: str, version: int | None) -> None:
        """Pin `name` to an existing version, or unpin it with None (newest wins again)."""
        model_dir = self._model_dir(name)
        if version is not None:
            version = validate_version(version)
            if version not in self.versions(name):
                raise ModelNotFound(
                    f"cannot pin model {name!r} to version {version}: it does not exist"
                    f"{_listing(self.versions(name))}"
                )
        elif not model_dir.is_dir():
            raise ModelNotFound(f"model {name!r} does not exist under {self.root}")
        self.update_policy(name, lambda policy: policy.model_copy(update={"pin": version}))

    def update_policy(self, name: str, change: Callable[[Policy], Policy | None]) -> Policy:
        """Read, `change` and write policy.json under the model's lock, so that replicas
        deciding at once (a canary withdrawn by two of them) never undo each other; `change`
        returns None to leave the file as it is. Returns the policy now in force."""
        model_dir = self._model_dir(name)
        if not model_dir.is_dir():
            raise ModelNotFound(f"model {name!r} does not exist under {self.root}")
        with self._locked(model_dir):
            current = self.policy(name)
            changed = change(current)
            if changed is None:
                return current
            write_durably(model_dir / POLICY_FILE, policy_bytes(changed))
            return changed

    # -- paths and locking -----------------------------------------------------------------

    def model_dir(self, name: str) -> Path:
        """The folder of `name`'s versions (ROOT/<name>, or ROOT itself in single-model mode)."""
        return self._model_dir(name)

    def _model_dir(self, name: str, *, create: bool = False) -> Path:
        model_dir = self.root / validate_name(name)
        if self.root.exists() and not self.root.is_dir():
            raise BadRequest(f"the model root {self.root} is not a folder")
        if create and not model_dir.is_dir():
            self.root.mkdir(parents=True, exist_ok=True)
            model_dir.mkdir(exist_ok=True)
            fsync_dir(self.root)
        return self._inside_root(model_dir)

    def _existing_version_dir(self, name: str, version: int) -> Path:
        path = self.version_dir(name, version)
        if not (path / MANIFEST_FILE).is_file():
            raise ModelNotFound(
                f"model {name!r} has no version {version}{_listing(self.versions(name))}"
            )
        return path

    def _inside_root(self, path: Path) -> Path:
        """Refuse a path that resolves outside the root (a symlinked model or version folder)."""
        if not path.resolve().is_relative_to(self.root.resolve()):
            raise BadRequest(f"{path} resolves outside the model root {self.root}")
        return path

    @contextmanager
    def _locked(self, model_dir: Path) -> Iterator[None]:
        """Exclusive lock on the model folder; a lock held by a killed process is released by
        the kernel, and the staging leftovers of such a process are removed here."""
        fd = os.open(model_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            _remove_stale_staging(model_dir)
            yield
        finally:
            os.close(fd)


def policy_bytes(policy: Policy) -> bytes:
    """policy.json's text: the pin always, every other field only when it is not its default
    (so a pin-only policy stays `{"pin": N}`), nested settings in full."""
    document = policy.model_dump(mode="json")
    defaults = Policy().model_dump(mode="json")
    kept = {k: v for k, v in document.items() if k == "pin" or v != defaults[k]}
    return json.dumps(kept).encode() + b"\n"


def validate_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        shown = repr(name) if len(str(name)) <= _SHOWN_NAME else f"{str(name)[:_SHOWN_NAME]!r}..."
        raise BadRequest(
            f"invalid model name {shown}: use 1-63 characters of a-z, 0-9, '_' and '-', "
            "starting with a letter or digit"
        )
    return name


def validate_version(version: object) -> int:
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise BadRequest(f"invalid version {version!r}: versions are positive integers")
    return version


def _version_numbers(model_dir: Path) -> list[int]:
    """Every integer-named folder, complete or not (so a new version never reuses a number;
    the mark in LAST_VERSION_FILE covers the folders deleted since)."""
    if not model_dir.is_dir():
        return []
    return [
        int(e.name)
        for e in os.scandir(model_dir)
        if _VERSION_PATTERN.match(e.name) and e.is_dir(follow_symlinks=False)
    ]


def _last_version(model_dir: Path) -> int:
    """The high-water mark: the highest version number ever handed out, 0 when unrecorded."""
    path = model_dir / LAST_VERSION_FILE
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:  # a repository made before the mark, or a new model
        return 0
    except (OSError, ValueError) as exc:  # unreadable, or not ASCII
        text = f"<{type(exc).__name__}>"
    if _VERSION_PATTERN.match(text):
        return int(text)
    logger.warning(
        "%s is not a version number (%.40r); numbering from the version folders instead, so a "
        "deleted version above the newest folder may get its number again. The next publish "
        "rewrites it.",
        path,
        text,
    )
    return 0


def _listing(versions: list[int]) -> str:
    return f" (available: {', '.join(map(str, versions))})" if versions else " (it has none)"


def read_export(source: Path) -> Manifest:
    """The draft manifest of an export folder; BadRequest when it is not one."""
    if not source.is_dir():
        raise BadRequest(f"{source} is not a folder; pass the folder `graft train` exported")
    if not (source / SAVED_MODEL_FILE).is_file():
        raise BadRequest(f"{source} has no {SAVED_MODEL_FILE}; it is not a SavedModel export")
    try:
        return Manifest.read(source)
    except ManifestError as exc:
        raise BadRequest(exc.message) from None


def _copy_tree(source: Path, target: Path) -> dict[str, str]:
    """Copy regular files and folders, fsyncing each; returns the sha256 of what was read, so
    the verification that follows catches a copy that went wrong."""
    hashes: dict[str, str] = {}
    target.mkdir()
    for folder, subfolders, files in os.walk(source):
        here = Path(folder)
        relative = here.relative_to(source)
        for entry in (*subfolders, *files):
            _refuse_special(here / entry)
        for sub in subfolders:
            (target / relative / sub).mkdir()
        for file in files:
            path = (relative / file).as_posix()
            if path != MANIFEST_FILE:
                hashes[path] = _copy_file(here / file, target / relative / file)
        fsync_dir(target / relative)
    return hashes


def _refuse_special(path: Path) -> None:
    if path.is_symlink() or not (path.is_file() or path.is_dir()):
        raise BadRequest(f"{path} is a link or special file; an export holds regular files only")


def _copy_file(source: Path, target: Path) -> str:
    digest = hashlib.sha256()
    with source.open("rb") as reader, target.open("xb") as writer:
        while chunk := reader.read(_CHUNK):
            digest.update(chunk)
            writer.write(chunk)
        writer.flush()
        os.fsync(writer.fileno())
    return digest.hexdigest()


def _owned_lock(lock: Path) -> int:
    """Create `lock` and hold an exclusive flock on it; returns the descriptor."""
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        # A sweeper may have taken the new file for an orphan and unlinked it between the two
        # calls; a lock on an unlinked file protects nothing, so make another.
        with suppress(FileNotFoundError):
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                return fd
        os.close(fd)


def _remove_orphaned_scratch(parent: Path) -> None:
    """Remove the scratch folders whose lock nobody holds: their owner was killed."""
    for lock in parent.glob("*.lock"):
        try:
            fd = os.open(lock, os.O_RDWR)
        except FileNotFoundError:  # its owner or another sweeper finished meanwhile
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # alive
            continue
        else:
            shutil.rmtree(lock.with_suffix(""), ignore_errors=True)
            lock.unlink(missing_ok=True)
        finally:
            os.close(fd)


def _remove_stale_staging(model_dir: Path) -> None:
    for entry in os.scandir(model_dir):
        if entry.name.startswith(STAGING_PREFIX):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                os.unlink(entry.path)

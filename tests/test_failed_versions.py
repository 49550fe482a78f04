"""FAILED survives restarts, a version that kills its loader is not loaded for ever, and every
field of graft.json is bounded before anything loads the version.

Restarts are real processes: a light Python process (no TensorFlow) runs a VersionManager over
the repository with a loader that blocks, and is killed with SIGKILL in the middle of the load,
as the OOM killer would.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from support.exports import make_tiny_export

from service.runtime.versions import VersionManager
from service.store.load_records import CRASHED_ATTEMPTS, LoadRecords, default_state_dir
from service.store.manifest import MAX_IMAGE_SIZE, ManifestError, sha256_file, verify_dir
from service.store.repository import ModelRepository
from service.wire import VersionState

LABELS = ["red", "green", "blue"]


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_export(tmp_path_factory.mktemp("failed") / "tiny", LABELS)


@pytest.fixture
def repository(tmp_path: Path, export_dir: Path) -> ModelRepository:
    repository = ModelRepository(tmp_path / "models")
    repository.publish(export_dir, "m")
    return repository


def edit_manifest(folder: Path, **changes: object) -> None:
    """Change graft.json by hand, as whoever writes the volume could (it is not hashed)."""
    path = folder / "graft.json"
    document = json.loads(path.read_text())
    document.update(changes)
    path.write_text(json.dumps(document))


def states(manager: VersionManager) -> dict[int, tuple[VersionState, str | None]]:
    (status,) = manager.status()
    return {v.version: (v.state, v.reason) for v in status.versions}


# -- FAILED across restarts ----------------------------------------------------------------------


def test_a_version_that_failed_to_load_stays_failed_after_a_restart(
    repository: ModelRepository,
) -> None:
    edit_manifest(repository.version_dir("m", 1), image_size=30000)
    first = VersionManager(repository, poll_interval_s=60)
    first.poll_once()
    state, reason = states(first)[1]
    assert state == VersionState.FAILED
    assert "image_size" in (reason or "") and str(MAX_IMAGE_SIZE) in (reason or "")

    attempts: list[int] = []

    def counting_loader(repo: ModelRepository, name: str, version: int) -> object:
        attempts.append(version)
        raise AssertionError("a FAILED version was loaded again")

    restarted = VersionManager(repository, poll_interval_s=60, loader=counting_loader)
    restarted.poll_once()
    assert attempts == []
    assert states(restarted)[1] == (VersionState.FAILED, reason)


def test_a_good_version_leaves_no_record_and_a_newer_failure_keeps_it_serving(
    repository: ModelRepository, export_dir: Path
) -> None:
    manager = VersionManager(repository, poll_interval_s=60)
    manager.poll_once()
    records = default_state_dir(repository)
    assert records is not None and not list(records.rglob("*.json"))
    repository.publish(export_dir, "m")
    edit_manifest(repository.version_dir("m", 2), labels=["x" * 129, "g", "b"])
    manager.poll_once()
    assert states(manager)[2][0] == VersionState.FAILED
    assert manager.get("m").version == 1
    restarted = VersionManager(repository, poll_interval_s=60)
    restarted.poll_once()
    assert restarted.get("m").version == 1, "after a restart the failed v2 must not be retried"
    assert states(restarted)[2][0] == VersionState.FAILED


_HANGING_LOAD = """
import sys, threading
from service.runtime.versions import VersionManager
from service.store.repository import ModelRepository

def hang(repository, name, version):
    print("loading", version, flush=True)
    threading.Event().wait()

VersionManager(ModelRepository(sys.argv[1]), poll_interval_s=60, loader=hang).poll_once()
"""


def killed_while_loading(repository: ModelRepository) -> None:
    """A serving process starts loading the model and is killed (SIGKILL) in the middle."""
    process = subprocess.Popen(
        [sys.executable, "-c", _HANGING_LOAD, str(repository.root)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "loading 1"
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()


def test_a_version_that_kills_its_loader_is_failed_after_two_deaths_not_loaded_for_ever(
    repository: ModelRepository,
) -> None:
    killed_while_loading(repository)
    records = LoadRecords(default_state_dir(repository))
    assert records.failures("m") == {}, "one death may be a stop: it is retried"
    for _ in range(CRASHED_ATTEMPTS - 1):
        killed_while_loading(repository)
    restarted = VersionManager(repository, poll_interval_s=60, loader=_refusing_loader)
    restarted.poll_once()
    state, reason = states(restarted)[1]
    assert state == VersionState.FAILED
    assert f"died {CRASHED_ATTEMPTS} times while loading" in (reason or "")
    # Deleting the record (the reason names it) lets the next start load it again.
    record = Path((reason or "").rsplit("delete ", 1)[1].split(" to retry")[0])
    record.unlink()
    again = VersionManager(repository, poll_interval_s=60)
    again.poll_once()
    assert again.get("m").version == 1


def _refusing_loader(repository: ModelRepository, name: str, version: int) -> object:
    raise AssertionError("a version that crashed its loader twice was loaded again")


def test_records_that_cannot_be_written_leave_failures_in_memory(
    repository: ModelRepository, tmp_path: Path
) -> None:
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the state folder should be")
    edit_manifest(repository.version_dir("m", 1), image_size=30000)
    manager = VersionManager(repository, poll_interval_s=60, records=LoadRecords(blocked / "s"))
    manager.poll_once()
    assert states(manager)[1][0] == VersionState.FAILED


def test_a_single_version_folder_gets_no_records(export_dir: Path) -> None:
    assert default_state_dir(ModelRepository(export_dir)) is None


def test_unreadable_or_foreign_records_are_ignored(tmp_path: Path) -> None:
    records = LoadRecords(tmp_path)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "1.json").write_text("not json")
    (tmp_path / "m" / "0.json").write_text('{"failed": "x"}')
    (tmp_path / "m" / ("9" * 200 + ".json")).write_text('{"failed": "x"}')
    (tmp_path / "m" / "2.json").write_text('{"attempts": true, "failed": null}')
    (tmp_path / "m" / "3.json").write_text('{"attempts": 5, "failed": null}')
    assert list(records.failures("m")) == [3]


# -- graft.json bounds ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"image_size": 30000}, "image_size"),
        ({"image_size": 0}, "image_size"),
        ({"labels": [f"l{i}" for i in range(10_001)]}, "labels"),
        ({"labels": ["red", "", "blue"]}, "labels.1"),
        ({"labels": ["red", "g" * 129, "blue"]}, "labels.1"),
        ({"metrics": {"junk": "x" * 70_000}}, "metrics"),
        ({"backbone": "b" * 65}, "backbone"),
        ({"name": "n" * 64}, "name"),
        ({"version": 10**18}, "version"),
        ({"dataset_fingerprint": "f" * 129}, "dataset_fingerprint"),
        ({"framework": {f"k{i}": "v" for i in range(33)}}, "framework"),
        ({"signatures": ["s"] * 17}, "signatures"),
        ({"files": {"saved_model.pb": "not a sha256"}}, "files"),
    ],
)
def test_every_manifest_field_is_bounded(
    repository: ModelRepository, changes: dict, field: str
) -> None:
    folder = repository.version_dir("m", 1)
    edit_manifest(folder, **changes)
    with pytest.raises(ManifestError, match=rf"invalid: {field}\b"):
        verify_dir(folder)


def test_a_huge_manifest_is_refused_without_reading_it_whole(repository: ModelRepository) -> None:
    folder = repository.version_dir("m", 1)
    with (folder / "graft.json").open("ab") as manifest:
        manifest.truncate(64 * 1024 * 1024)  # sparse: 64 MiB of zeros after the JSON
    with pytest.raises(ManifestError, match="is over 4194304 bytes"):
        verify_dir(folder)


def test_a_huge_labels_file_is_refused_even_when_its_hash_is_listed(
    repository: ModelRepository,
) -> None:
    folder = repository.version_dir("m", 1)
    labels = folder / "assets" / "labels.txt"
    with labels.open("ab") as handle:
        handle.truncate(16 * 1024 * 1024)
    files = json.loads((folder / "graft.json").read_text())["files"]
    edit_manifest(folder, files={**files, "assets/labels.txt": sha256_file(labels)})
    with pytest.raises(ManifestError, match=r"labels\.txt is over"):
        verify_dir(folder)

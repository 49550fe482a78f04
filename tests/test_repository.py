"""The model repository: atomic, crash-safe publishing, verification, names, pinning."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from support.exports import make_tiny_export

from service.errors import BadRequest, ModelNotFound
from service.store.manifest import ManifestError, verify_dir
from service.store.repository import ModelRepository, RepositoryError

LABELS = ["red", "green", "blue"]


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_export(tmp_path_factory.mktemp("export") / "tiny", LABELS)


@pytest.fixture
def repo(tmp_path: Path) -> ModelRepository:
    return ModelRepository(tmp_path / "models")


def _light_python(code: str, *args: str) -> subprocess.Popen[str]:
    """A Python process running `code` that imports the repository but never TensorFlow."""
    return subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True)


def test_publish_numbers_versions_and_writes_a_complete_manifest(repo, export_dir):
    before = {p: p.read_bytes() for p in export_dir.rglob("*") if p.is_file()}
    assert repo.publish(export_dir, "flowers") == 1
    assert repo.publish(export_dir, "flowers") == 2
    assert repo.publish(export_dir, "other") == 1
    assert repo.models() == ["flowers", "other"]
    assert repo.versions("flowers") == [1, 2]
    manifest = repo.verify("flowers", 2)
    assert (manifest.name, manifest.version, manifest.labels) == ("flowers", 2, LABELS)
    assert repo.version_dir("flowers", 2) == repo.root / "flowers" / "2"
    assert {"saved_model.pb", "assets/labels.txt", "variables/variables.index"} <= set(
        manifest.files
    )
    assert before == {p: p.read_bytes() for p in export_dir.rglob("*") if p.is_file()}
    assert not [p for p in (repo.root / "flowers").iterdir() if p.name.startswith(".staging")]


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        (lambda d: _flip_byte(d / "variables" / "variables.data-00000-of-00001"), "changed"),
        (lambda d: (d / "saved_model.pb").unlink(), "missing"),
        (lambda d: (d / "assets" / "extra.txt").write_text("x"), "not in manifest"),
        (lambda d: (d / "assets" / "labels.txt").write_text("a\nb\nc\n"), "changed"),
        (lambda d: _edit_manifest(d, labels=["a", "b", "c"]), "disagrees"),
        (lambda d: _edit_manifest(d, version=7), "version 7"),
        (lambda d: (d / "graft.json").write_text("{"), "invalid"),
        (lambda d: (d / "variables" / "link").symlink_to("/etc/passwd"), "link"),
    ],
)
def test_a_tampered_version_fails_verification(repo, export_dir, tamper, message):
    version = repo.publish(export_dir, "flowers")
    tamper(repo.version_dir("flowers", version))
    with pytest.raises(ManifestError, match=message):
        repo.verify("flowers", version)


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _edit_manifest(folder: Path, **changes: object) -> None:
    manifest = json.loads((folder / "graft.json").read_text())
    (folder / "graft.json").write_text(json.dumps({**manifest, **changes}))


@pytest.mark.parametrize(
    "name", ["..", "../x", "/etc", "a/b", "A", "", ".staging-x", "-x", "x" * 64, "caf\u00e9", 3]
)
def test_invalid_names_are_refused_everywhere(repo, export_dir, name):
    for call in (
        lambda: repo.publish(export_dir, name),
        lambda: repo.versions(name),
        lambda: repo.resolve(name),
        lambda: repo.set_pin(name, None),
        lambda: repo.version_dir(name, 1),
    ):
        with pytest.raises(BadRequest, match="invalid model name"):
            call()
    assert not repo.root.exists() or not any(repo.root.iterdir())


@pytest.mark.parametrize("version", [0, -1, True, "1", 1.0, None])
def test_invalid_versions_are_refused(repo, export_dir, version):
    repo.publish(export_dir, "flowers")
    with pytest.raises(BadRequest, match="invalid version"):
        repo.version_dir("flowers", version)


def test_symlinks_out_of_the_root_are_refused(repo, export_dir, tmp_path):
    outside = tmp_path / "outside"
    ModelRepository(outside).publish(export_dir, "evil")
    repo.publish(export_dir, "flowers")
    (repo.root / "evil").symlink_to(outside / "evil")
    (repo.root / "flowers" / "5").symlink_to(outside / "evil" / "1")
    assert repo.models() == ["flowers"]
    assert repo.versions("flowers") == [1]
    with pytest.raises(BadRequest, match="outside the model root"):
        repo.versions("evil")
    with pytest.raises(BadRequest, match="outside the model root"):
        repo.version_dir("flowers", 5)

    linked = tmp_path / "linked-export"
    shutil.copytree(export_dir, linked)
    (linked / "assets" / "secrets").symlink_to("/etc/passwd")
    with pytest.raises(BadRequest, match="link or special file"):
        repo.publish(linked, "flowers")
    assert repo.versions("flowers") == [1]


def test_publishing_something_that_is_not_an_export_is_refused(repo, export_dir, tmp_path):
    with pytest.raises(BadRequest, match="is not a folder"):
        repo.publish(tmp_path / "nope", "flowers")
    bare = tmp_path / "bare"
    shutil.copytree(export_dir, bare)
    (bare / "graft.json").unlink()
    with pytest.raises(BadRequest, match="not a graft export"):
        repo.publish(bare, "flowers")
    (bare / "saved_model.pb").unlink()
    with pytest.raises(BadRequest, match=r"no saved_model\.pb"):
        repo.publish(bare, "flowers")
    assert not repo.root.exists(), "a refused publish must create nothing"
    repo.root.write_text("a file")
    with pytest.raises(BadRequest, match="is not a folder"):
        repo.publish(export_dir, "flowers")


def test_pin_unpin_and_resolve(repo, export_dir):
    with pytest.raises(ModelNotFound):
        repo.resolve("flowers")
    for _ in range(3):
        repo.publish(export_dir, "flowers")
    assert (repo.pin("flowers"), repo.resolve("flowers")) == (None, 3)
    repo.set_pin("flowers", 2)
    policy = json.loads((repo.root / "flowers" / "policy.json").read_text())
    assert policy == {"pin": 2}
    assert (repo.pin("flowers"), repo.resolve("flowers")) == (2, 2)
    assert repo.resolve("flowers", 3) == 3, "an explicit version beats the pin"
    with pytest.raises(ModelNotFound, match="available: 1, 2, 3"):
        repo.resolve("flowers", 9)
    with pytest.raises(ModelNotFound, match="does not exist"):
        repo.set_pin("flowers", 9)
    repo.set_pin("flowers", None)
    assert json.loads((repo.root / "flowers" / "policy.json").read_text()) == {"pin": None}
    assert repo.resolve("flowers") == 3
    with pytest.raises(ModelNotFound):
        repo.set_pin("ghost", None)


def test_a_pin_to_a_removed_version_or_a_broken_policy_is_reported(repo, export_dir):
    repo.publish(export_dir, "flowers")
    repo.publish(export_dir, "flowers")
    repo.set_pin("flowers", 1)
    shutil.rmtree(repo.version_dir("flowers", 1))
    with pytest.raises(ModelNotFound, match="pinned to version 1"):
        repo.resolve("flowers")
    for broken in ('{"pin": "two"}', '{"pin": 0}', '{"pin": true}', "[]", "not json"):
        (repo.root / "flowers" / "policy.json").write_text(broken)
        with pytest.raises(RepositoryError, match=r"policy\.json"):
            repo.pin("flowers")
    assert repo.publish(export_dir, "flowers") == 3, "a removed number is never reused"


def test_a_deleted_newest_version_never_gives_its_number_again(repo, export_dir):
    """The gateway caches metadata per (name, version) and the version manager matches its
    previous model by number: a number once published must never name another model."""
    for _ in range(3):
        repo.publish(export_dir, "flowers")
    shutil.rmtree(repo.version_dir("flowers", 3))
    assert repo.versions("flowers") == [1, 2]
    assert repo.publish(export_dir, "flowers") == 4
    for version in (4, 2):
        shutil.rmtree(repo.version_dir("flowers", version))
    assert ModelRepository(repo.root).publish(export_dir, "flowers") == 5  # a fresh object too
    assert repo.versions("flowers") == [1, 5]
    assert repo.verify("flowers", 5).version == 5
    assert (repo.root / "flowers" / ".last-version").read_text() == "5\n"


def test_a_refused_export_costs_no_number(repo, export_dir, tmp_path):
    repo.publish(export_dir, "flowers")
    linked = tmp_path / "linked"
    shutil.copytree(export_dir, linked)
    (linked / "assets" / "link").symlink_to("/etc/passwd")
    with pytest.raises(BadRequest, match="link or special file"):
        repo.publish(linked, "flowers")
    assert repo.publish(export_dir, "flowers") == 2


def test_the_mark_is_neither_a_version_nor_a_model(repo, export_dir):
    repo.publish(export_dir, "flowers")
    repo.publish(export_dir, "flowers")
    mark = repo.root / "flowers" / ".last-version"
    assert mark.is_file()
    assert repo.versions("flowers") == [1, 2] and repo.models() == ["flowers"]
    for version in (1, 2):
        shutil.rmtree(repo.version_dir("flowers", version))
    assert mark.is_file(), "deleting versions keeps the mark"
    assert (repo.versions("flowers"), repo.models()) == ([], [])
    with pytest.raises(ModelNotFound, match="has no versions"):
        repo.resolve("flowers")
    assert repo.publish(export_dir, "flowers") == 3
    assert repo.models() == ["flowers"]


def test_a_repository_made_before_the_mark_keeps_working(repo, export_dir):
    """No mark: numbered from the folders, and the next publish writes the mark."""
    for _ in range(3):
        repo.publish(export_dir, "flowers")
    mark = repo.root / "flowers" / ".last-version"
    mark.unlink()
    shutil.rmtree(repo.version_dir("flowers", 1))
    assert (repo.versions("flowers"), repo.resolve("flowers")) == ([2, 3], 3)
    repo.set_pin("flowers", 2)
    assert repo.resolve("flowers") == 2
    assert repo.publish(export_dir, "flowers") == 4
    assert mark.read_text() == "4\n"
    shutil.rmtree(repo.version_dir("flowers", 4))
    assert repo.publish(export_dir, "flowers") == 5


def test_a_mark_above_the_folders_wins_as_after_a_crash_before_the_rename(repo, export_dir):
    """A publisher killed between writing the mark and the rename skips its number."""
    repo.publish(export_dir, "flowers")
    (repo.root / "flowers" / ".last-version").write_text("41\n")
    assert repo.publish(export_dir, "flowers") == 42
    assert repo.versions("flowers") == [1, 42]


@pytest.mark.parametrize("broken", ["", "seven\n", "0\n", "-3", "1e3", "9" * 19, b"\xff\xfe"])
def test_a_broken_mark_falls_back_to_the_folders_with_a_warning_and_is_rewritten(
    repo, export_dir, caplog, broken
):
    repo.publish(export_dir, "flowers")
    repo.publish(export_dir, "flowers")
    mark = repo.root / "flowers" / ".last-version"
    (mark.write_bytes if isinstance(broken, bytes) else mark.write_text)(broken)
    with caplog.at_level("WARNING", logger="graft.store"):
        assert repo.publish(export_dir, "flowers") == 3
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert ".last-version is not a version number" in caplog.text
    assert "numbering from the version folders" in caplog.text
    assert mark.read_text() == "3\n"
    caplog.clear()
    assert repo.publish(export_dir, "flowers") == 4
    assert not caplog.records, "a rewritten mark is read without a warning"


def _publish_concurrently(repo: ModelRepository, export_dir: Path) -> list[int]:
    """Three threads in one process and three separate processes publish `m` at once."""
    results: list[int] = []
    threads = [
        threading.Thread(target=lambda: results.append(repo.publish(export_dir, "m")))
        for _ in range(3)
    ]
    code = (
        "from service.store.repository import ModelRepository;"
        f"print(ModelRepository({str(repo.root)!r}).publish({str(export_dir)!r}, 'm'))"
    )
    processes = [_light_python(code) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    results += [int(p.communicate(timeout=120)[0]) for p in processes]
    return results


def test_concurrent_publishes_get_distinct_versions(repo, export_dir):
    """Threads in one process and separate processes, all publishing the same model at once."""
    results = _publish_concurrently(repo, export_dir)
    assert sorted(results) == [1, 2, 3, 4, 5, 6]
    assert repo.versions("m") == [1, 2, 3, 4, 5, 6]
    for version in results:
        repo.verify("m", version)
    assert (repo.root / "m" / ".last-version").read_text() == "6\n"


def test_concurrent_publishes_after_a_deletion_get_distinct_new_versions(repo, export_dir):
    repo.publish(export_dir, "m")
    repo.publish(export_dir, "m")
    shutil.rmtree(repo.version_dir("m", 2))
    results = _publish_concurrently(repo, export_dir)
    assert sorted(results) == [3, 4, 5, 6, 7, 8]
    assert repo.versions("m") == [1, 3, 4, 5, 6, 7, 8]
    assert (repo.root / "m" / ".last-version").read_text() == "8\n"


# A light process (no TensorFlow) that forks publishers on request, so each kill costs a fork
# rather than a Python start-up. "start" forks a child that publishes in a loop and prints its
# pid; "wait" reaps it and prints how it ended.
FORKER = """
import os, sys
from service.store.repository import ModelRepository
assert "tensorflow" not in sys.modules
repository = ModelRepository(sys.argv[1])
child = None
for command in sys.stdin:
    if command.strip() == "start":
        child = os.fork()
        if child == 0:
            try:
                while True:
                    repository.publish(sys.argv[2], "m")
            finally:
                os._exit(3)
        print(child, flush=True)
    else:
        _, status = os.waitpid(child, 0)
        print(os.WTERMSIG(status) if os.WIFSIGNALED(status) else -1, flush=True)
"""


def test_kill_9_while_publishing_never_leaves_a_broken_version(repo, export_dir):
    """SIGKILL a process that publishes in a loop at random instants, many times: every integer
    folder that exists afterwards verifies, and the next publish cleans up and succeeds."""
    rng = random.Random(1234)
    model_dir = repo.root / "m"
    forker = subprocess.Popen(
        [sys.executable, "-c", FORKER, str(repo.root), str(export_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    kills, interrupted, deadline = 0, 0, time.monotonic() + 25
    try:
        while kills < 150 and time.monotonic() < deadline:
            forker.stdin.write("start\n")
            forker.stdin.flush()
            pid = int(forker.stdout.readline())
            time.sleep(rng.uniform(0, 0.12))
            os.kill(pid, signal.SIGKILL)
            forker.stdin.write("wait\n")
            forker.stdin.flush()
            assert int(forker.stdout.readline()) == signal.SIGKILL, "the publisher failed"
            kills += 1
            entries = list(model_dir.iterdir()) if model_dir.exists() else []
            interrupted += any(e.name.startswith(".staging") for e in entries)
            for entry in (e for e in entries if e.name.isdigit()):
                verify_dir(entry, name="m", version=int(entry.name))
    finally:
        forker.stdin.close()
        forker.wait(timeout=30)
    assert kills >= 50 and interrupted >= 10, (kills, interrupted)
    assert repo.versions("m"), "no publish ever completed; the test proved nothing"
    mark = int((model_dir / ".last-version").read_text())
    assert mark >= max(repo.versions("m")), "the mark never lags a published version"
    next_version = repo.publish(export_dir, "m")
    assert next_version == max(int(e.name) for e in model_dir.iterdir() if e.name.isdigit())
    assert next_version == mark + 1, "numbered above every number handed out, none reused"
    assert not [e for e in model_dir.iterdir() if e.name.startswith(".staging")]


# -- scratch folders ----------------------------------------------------------------------------

# Enters a scratch folder, writes into it, reports its path, then waits to be killed.
SCRATCH_HOLDER = """
import sys, time
from service.store.repository import ModelRepository
with ModelRepository(sys.argv[1]).scratch() as folder:
    (folder / "half-unpacked").write_bytes(b"x" * 1024)
    print(folder, flush=True)
    time.sleep(600)
"""


def test_a_scratch_folder_is_private_and_removed_on_exit_even_on_error(repo):
    with repo.scratch() as first, repo.scratch() as second:
        assert first != second and first.is_dir() and not any(first.iterdir())
        assert first.parent == second.parent == repo.root / ".scratch"
    assert repo.scratch_folders() == []
    with pytest.raises(RuntimeError), repo.scratch() as folder:
        (folder / "partial").write_bytes(b"x")
        raise RuntimeError("the push failed half way")
    assert repo.scratch_folders() == []


def test_a_killed_owners_scratch_is_removed_by_the_next_a_live_ones_kept(repo, export_dir):
    killed = _light_python(SCRATCH_HOLDER, str(repo.root))
    alive = _light_python(SCRATCH_HOLDER, str(repo.root))
    try:
        dead_folder = Path(killed.stdout.readline().strip())
        live_folder = Path(alive.stdout.readline().strip())
        killed.kill()
        killed.wait(timeout=30)
        assert dead_folder.is_dir()  # nothing cleans up after SIGKILL by itself
        with repo.scratch() as mine:
            assert not dead_folder.exists(), "the killed push's scratch folder was left behind"
            assert live_folder.is_dir(), "a running push's scratch folder was removed"
            assert mine.is_dir()
    finally:
        alive.kill()
        alive.wait(timeout=30)
    repo.publish(export_dir, "m")
    assert repo.models() == ["m"]  # .scratch is no model


def test_a_scratch_path_that_is_not_a_folder_is_refused_naming_it(repo, export_dir):
    repo.publish(export_dir, "m")
    (repo.root / ".scratch").write_text("someone's notes")
    refused = pytest.raises(RepositoryError, match=r"\.scratch is not a folder; remove it")
    with refused, repo.scratch():
        pass
    assert (repo.root / ".scratch").read_text() == "someone's notes"  # nothing lost
    assert repo.versions("m") == [1]

"""Single-model mode (KServe): one model's folder as the repository, with real files.

The single-model view of MODEL_ROOT/<model> and the multi-model view of MODEL_ROOT share
versions, pin and lock, so everything `ModelRepository` guarantees holds through either. A
folder holding one version's files is served read-only. `graft serve --model-name` refuses, in
one line and before installing anything, a folder it could not serve.
"""

import shutil
import threading
from pathlib import Path

import pytest
from support.exports import make_tiny_export
from typer.testing import CliRunner

from graft_cli import app
from service.errors import BadRequest, ModelNotFound, ReadOnlyRepository
from service.store.manifest import ManifestError
from service.store.repository import ModelRepository
from service.store.single_model import (
    SingleModelRepository,
    SingleVersionRepository,
    open_repository,
)

LABELS = ["red", "green", "blue"]


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_export(tmp_path_factory.mktemp("export") / "tiny", LABELS)


@pytest.fixture
def repository(tmp_path: Path) -> ModelRepository:
    """The multi-model repository, as `graft train` / `graft publish` and the CronJob see it."""
    return ModelRepository(tmp_path / "models")


def test_a_model_folder_is_one_model_served_under_the_given_name(repository, export_dir):
    repository.publish(export_dir, "apple")
    repository.publish(export_dir, "apple")
    repository.publish(export_dir, "pear")
    single = open_repository(repository.root / "apple", "leaves")
    assert type(single) is SingleModelRepository
    assert single.models() == ["leaves"]
    assert single.versions("leaves") == [1, 2]
    assert single.resolve("leaves") == 2
    assert single.version_dir("leaves", 1) == repository.root / "apple" / "1"
    manifest = single.verify("leaves", 2)  # graft.json says "apple": the name is KServe's
    assert (manifest.name, manifest.version, manifest.labels) == ("apple", 2, LABELS)
    for call in (lambda: single.versions("apple"), lambda: single.resolve("pear")):
        with pytest.raises(ModelNotFound, match="serves only 'leaves'"):
            call()
    with pytest.raises(BadRequest, match="invalid model name"):
        open_repository(repository.root / "apple", "Leaves!")
    assert type(open_repository(repository.root)) is ModelRepository


def test_both_views_share_versions_pin_and_lock(repository, export_dir):
    """Publishers through either view at once get distinct versions; a pin set through one is
    the pin of the other; leftovers of a dead publisher are removed under the shared lock."""
    repository.publish(export_dir, "apple")
    single = SingleModelRepository(repository.root / "apple", "apple")
    stale = single.root / ".staging-deadbeef"
    stale.mkdir()
    results: list[int] = []
    publishers = [
        threading.Thread(target=lambda view=view: results.append(view.publish(export_dir, "apple")))
        for view in (single, repository) * 3
    ]
    for thread in publishers:
        thread.start()
    for thread in publishers:
        thread.join()
    assert sorted(results) == [2, 3, 4, 5, 6, 7]
    assert single.versions("apple") == repository.versions("apple") == [1, 2, 3, 4, 5, 6, 7]
    for version in results:
        assert single.verify("apple", version) == repository.verify("apple", version)
    assert not stale.exists()

    repository.set_pin("apple", 3)
    assert (single.pin("apple"), single.resolve("apple")) == (3, 3)
    single.set_pin("apple", None)
    assert (repository.pin("apple"), repository.resolve("apple")) == (None, 7)
    with pytest.raises(ModelNotFound, match="does not exist"):
        single.set_pin("apple", 9)


def test_both_views_share_the_mark_so_no_number_comes_round_again(repository, export_dir):
    for _ in range(3):
        repository.publish(export_dir, "apple")
    single = open_repository(repository.root / "apple", "leaves")
    shutil.rmtree(single.version_dir("leaves", 3))
    assert single.publish(export_dir, "leaves") == 4
    shutil.rmtree(repository.version_dir("apple", 4))
    assert repository.publish(export_dir, "apple") == 5
    shutil.rmtree(single.version_dir("leaves", 5))
    assert single.publish(export_dir, "leaves") == 6
    assert (single.root / ".last-version").read_text() == "6\n"
    assert single.versions("leaves") == repository.versions("apple") == [1, 2, 6]
    assert (single.models(), repository.models()) == (["leaves"], ["apple"])
    for version in (1, 2, 6):
        shutil.rmtree(single.version_dir("leaves", version))
    assert (single.models(), single.versions("leaves")) == ([], [])
    assert type(open_repository(single.root, "leaves")) is SingleModelRepository
    assert ModelRepository(single.root).models() == [], "the mark is no model of a repository"
    assert single.publish(export_dir, "leaves") == 7


def test_a_single_model_folder_without_the_mark_keeps_working(repository, export_dir):
    repository.publish(export_dir, "apple")
    repository.publish(export_dir, "apple")
    single = SingleModelRepository(repository.root / "apple", "apple")
    (single.root / ".last-version").unlink()  # as a folder published before the mark
    assert (single.versions("apple"), single.resolve("apple")) == ([1, 2], 2)
    assert single.publish(export_dir, "apple") == 3
    assert (single.root / ".last-version").read_text() == "3\n"


def test_a_new_single_model_folder_is_created_on_first_publish(tmp_path, export_dir):
    single = SingleModelRepository(tmp_path / "mnt" / "models", "apple")
    assert single.models() == []
    with pytest.raises(ModelNotFound, match="has no versions"):
        single.resolve("apple")
    assert single.publish(export_dir, "apple") == 1
    assert (tmp_path / "mnt" / "models" / "1" / "graft.json").is_file()
    assert (tmp_path / "mnt" / "models" / ".last-version").read_text() == "1\n"
    assert single.models() == ["apple"]


def test_symlinks_and_tampering_are_refused_as_in_the_repository(repository, export_dir, tmp_path):
    repository.publish(export_dir, "apple")
    outside = ModelRepository(tmp_path / "outside")
    outside.publish(export_dir, "evil")
    single = SingleModelRepository(repository.root / "apple", "apple")
    (single.root / "5").symlink_to(outside.version_dir("evil", 1))
    assert single.versions("apple") == [1]
    with pytest.raises(BadRequest, match="outside the model root"):
        single.version_dir("apple", 5)
    (single.version_dir("apple", 1) / "assets" / "extra.txt").write_text("x")
    with pytest.raises(ManifestError, match="not in manifest"):
        single.verify("apple", 1)
    shutil.copytree(outside.version_dir("evil", 1), single.root / "2")
    with pytest.raises(ManifestError, match="says version 1, not 2"):
        single.verify("apple", 2)


def test_one_versions_files_at_the_root_are_served_read_only_as_that_version(
    repository, export_dir, tmp_path
):
    repository.publish(export_dir, "apple")
    repository.publish(export_dir, "apple")
    flat = tmp_path / "mnt-models"
    shutil.copytree(repository.version_dir("apple", 2), flat)  # storageUri: .../apple/2
    single = open_repository(flat, "leaves")
    assert type(single) is SingleVersionRepository
    assert single.models() == ["leaves"]
    assert (single.versions("leaves"), single.resolve("leaves"), single.pin("leaves")) == (
        [2],
        2,
        None,
    )
    assert single.version_dir("leaves", 2) == flat
    assert single.verify("leaves", 2).labels == LABELS
    with pytest.raises(ModelNotFound, match="no version 1"):
        single.resolve("leaves", 1)
    for write in (
        lambda: single.publish(export_dir, "leaves"),
        lambda: single.set_pin("leaves", 2),
        lambda: single.scratch(),
    ):
        with pytest.raises(ReadOnlyRepository, match="read-only"):
            write()
    assert sorted(p.name for p in flat.iterdir()) == sorted(
        p.name for p in repository.version_dir("apple", 2).iterdir()
    ), "nothing may be written into a read-only mount"
    assert not (flat / ".last-version").exists()
    (flat / "saved_model.pb").write_bytes(b"tampered")
    with pytest.raises(ManifestError, match="changed"):
        single.verify("leaves", 2)


def test_an_unpublished_export_at_the_root_is_version_1(tmp_path, export_dir):
    flat = tmp_path / "export-copy"
    shutil.copytree(export_dir, flat)
    single = open_repository(flat, "leaves")
    assert single.versions("leaves") == [1]
    assert single.verify("leaves", 1).version is None


# -- graft serve --model-name refuses what it could not serve, before starting ----------------


def _serve(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(
        app, ["serve", *args], env={"GRAFT_ADMIN_TOKEN": None, **(env or {})}
    )
    return result.exit_code, result.output


def test_serve_refuses_a_folder_with_no_version_and_installs_nothing(tmp_path):
    code, output = _serve("--model-root", str(tmp_path), "--model-name", "apple")
    assert code == 1, output
    assert f"{tmp_path} holds no version of model 'apple'" in output
    assert "1/saved_model.pb + graft.json" in output
    assert not any(tmp_path.iterdir()), "single-model mode never installs the ImageNet default"


def test_serve_points_a_whole_repository_at_the_model_folder(repository, export_dir):
    repository.publish(export_dir, "apple")
    code, output = _serve("--model-root", str(repository.root), env={"GRAFT_MODEL_NAME": "apple"})
    assert code == 1, output
    assert "a repository of the models apple" in output
    assert str(repository.root / "apple") in output


@pytest.mark.parametrize(
    ("args", "env", "code", "message"),
    [
        (["--model-name", "Apple!"], {}, 1, "invalid model name 'Apple!'"),
        (["--model-name", "apple", "--default-model", "pear"], {}, 2, "GRAFT_DEFAULT_MODEL"),
    ],
)
def test_serve_refuses_settings_single_model_mode_cannot_honour(
    repository, export_dir, args, env, code, message
):
    repository.publish(export_dir, "apple")
    exit_code, output = _serve("--model-root", str(repository.root / "apple"), *args, env=env)
    assert exit_code == code, output
    assert message in output


def test_serve_refuses_a_root_whose_graft_json_is_broken(tmp_path, export_dir):
    flat = tmp_path / "flat"
    shutil.copytree(export_dir, flat)
    (flat / "graft.json").write_text("{")
    code, output = _serve("--model-root", str(flat), "--model-name", "apple")
    assert code == 1, output
    assert "graft.json is invalid" in output

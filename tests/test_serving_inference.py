"""The inference side in-process: LoadedModel checks, VersionManager swaps, batch isolation.

Real SavedModels in a real repository; the manager is driven with `poll_once()` so every
step is deterministic (the server tests cover the polling thread).
"""

import json
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from support.trained import COLOURS, tinted_photo

from service.errors import ModelNotFound, NotReady, RejectedModel
from service.runtime.batch_runner import InferItem, InferResult, run_batch
from service.runtime.loaded_model import LoadedModel
from service.runtime.versions import VersionManager, VersionState
from service.store.manifest import Manifest, hash_tree
from service.store.repository import ModelRepository

MODEL = "colours"


class CountingLoader:
    """The real loader, counting its calls (to prove a rollback needs no load)."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, repository: ModelRepository, name: str, version: int) -> LoadedModel:
        self.calls.append(version)
        return LoadedModel.load(repository, name, version)


@pytest.fixture
def repository(tmp_path: Path, colour_export: Path) -> ModelRepository:
    repository = ModelRepository(tmp_path / "models")
    repository.publish(colour_export, MODEL)
    return repository


def _items(*images: bytes, version: int | None = None, model: str = MODEL) -> list[InferItem]:
    now = time.time()
    return [InferItem(model=model, version=version, image=i, enqueued_at=now) for i in images]


def _labels(results: list[InferResult]) -> list[str | None]:
    return [COLOURS[int(np.argmax(r.array()))] if r.error_code is None else None for r in results]


def test_one_undecodable_image_fails_alone_and_the_rest_of_the_batch_is_answered(
    repository: ModelRepository,
) -> None:
    manager = VersionManager(repository, poll_interval_s=60)
    manager.poll_once()
    truncated = tinted_photo("green")[:300]
    images = [tinted_photo("red"), b"GIF89a but not really a gif", truncated, tinted_photo("blue")]
    results = run_batch(manager, _items(*images))
    assert _labels(results) == ["red", None, None, "blue"]
    for bad in results[1:3]:
        assert bad.error_code == "invalid_image" and "cannot be decoded" in (bad.error or "")
    good = results[0].array()
    assert good.shape == (len(COLOURS),) and good.sum() == pytest.approx(1.0, abs=1e-4)


def test_one_bad_image_in_a_batch_costs_a_few_calls_not_one_per_image(
    repository: ModelRepository, monkeypatch: pytest.MonkeyPatch
) -> None:
    manager = VersionManager(repository, poll_interval_s=60)
    manager.poll_once()
    calls: list[int] = []
    predict = LoadedModel.predict

    def counted(model: LoadedModel, images: list[bytes]) -> np.ndarray:
        calls.append(len(images))
        return predict(model, images)

    monkeypatch.setattr(LoadedModel, "predict", counted)
    images = [tinted_photo(COLOURS[i % len(COLOURS)]) for i in range(16)]
    images[11] = b"GIF89a but not really a gif"
    results = run_batch(manager, _items(*images))
    expected = [None if i == 11 else COLOURS[i % len(COLOURS)] for i in range(16)]
    assert _labels(results) == expected
    assert len(calls) <= 1 + 2 * 4, f"{len(calls)} model calls for one bad image in 16: {calls}"


def test_a_batch_mixing_models_and_versions_is_grouped_correctly(
    repository: ModelRepository, colour_export: Path
) -> None:
    manager = VersionManager(repository, poll_interval_s=60)
    manager.poll_once()
    repository.publish(colour_export, MODEL)
    manager.poll_once()  # v2 active, v1 previous
    red, blue = tinted_photo("red"), tinted_photo("blue")
    items = [
        *_items(red, version=1),
        *_items(blue),
        *_items(red, model="absent"),
        *_items(blue, version=2),
    ]
    results = run_batch(manager, items)
    assert [r.version for r in results] == [1, 2, None, 2]
    assert _labels(results) == ["red", "blue", None, "blue"]
    assert results[2].error_code == "not_found"


def test_swaps_keep_active_and_previous_and_roll_back_without_a_load(
    repository: ModelRepository, colour_export: Path
) -> None:
    loader = CountingLoader()
    manager = VersionManager(repository, poll_interval_s=60, loader=loader)
    manager.poll_once()
    for _ in range(2):
        repository.publish(colour_export, MODEL)
    manager.poll_once()  # straight to the newest: 3
    assert loader.calls == [1, 3]
    (status,) = manager.status()
    assert (status.active_version, status.previous_version) == (3, 1)
    states = {v.version: v.state for v in status.versions}
    assert states == {
        1: VersionState.AVAILABLE,
        2: VersionState.UNLOADED,
        3: VersionState.AVAILABLE,
    }

    repository.set_pin(MODEL, 1)
    manager.poll_once()
    assert manager.get(MODEL).version == 1 and loader.calls == [1, 3]  # rollback: no load
    repository.set_pin(MODEL, 2)
    manager.poll_once()
    assert manager.get(MODEL).version == 2 and loader.calls == [1, 3, 2]
    (status,) = manager.status()
    assert (status.active_version, status.previous_version, status.pin) == (2, 1, 2)
    with pytest.raises(ModelNotFound, match="not loaded"):
        manager.get(MODEL, 3)  # dropped: only active and previous stay in memory


def test_a_failing_version_is_failed_with_its_reason_and_the_newest_good_one_serves(
    repository: ModelRepository, colour_export: Path
) -> None:
    manager = VersionManager(repository, poll_interval_s=60)
    manager.poll_once()
    version = repository.publish(colour_export, MODEL)
    folder = repository.version_dir(MODEL, version)
    (folder / "saved_model.pb").write_bytes(b"tampered")
    manager.poll_once()
    (status,) = manager.status()
    failed = next(v for v in status.versions if v.version == version)
    assert failed.state == VersionState.FAILED
    assert "does not match its manifest" in (failed.reason or "")
    assert status.active_version == 1 and manager.get(MODEL).version == 1
    manager.poll_once()  # never retried, still serving 1
    assert manager.get(MODEL).version == 1


def _wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what} after {timeout_s} s"
        time.sleep(0.05)


def test_a_hanging_load_holds_back_no_other_model(
    repository: ModelRepository, colour_export: Path
) -> None:
    """The polling thread as in production: while `slow`'s load is blocked, `quick`, published
    after it, loads and serves; released, `slow` is swapped in."""
    entered, release = threading.Event(), threading.Event()

    def gated(repository: ModelRepository, name: str, version: int) -> LoadedModel:
        if name == "slow":
            entered.set()
            release.wait(120)
        return LoadedModel.load(repository, name, version)

    manager = VersionManager(repository, poll_interval_s=0.1, loader=gated)
    manager.start()
    try:
        repository.publish(colour_export, "slow")
        _wait_until(entered.is_set, "the slow load to start")
        repository.publish(colour_export, "quick")
        _wait_until(lambda: manager.ready("quick"), "quick to load beside the blocked one")
        states = {s.name: s.versions[0].state for s in manager.status()}
        assert states == {
            MODEL: VersionState.AVAILABLE,
            "quick": VersionState.AVAILABLE,
            "slow": VersionState.LOADING,
        }
        with pytest.raises(NotReady, match="still loading version 1"):
            manager.get("slow")
        release.set()
        _wait_until(lambda: manager.ready("slow"), "slow to load once released")
        assert manager.get("slow").version == 1
    finally:
        release.set()
        manager.stop()
    alive = [
        t.name for t in threading.enumerate() if t.name in ("graft-load-slow", "graft-load-quick")
    ]
    assert alive == []


def test_a_rollback_during_a_load_swaps_at_once_and_the_load_is_dropped(
    repository: ModelRepository, colour_export: Path
) -> None:
    entered, release = threading.Event(), threading.Event()

    def gated(repository: ModelRepository, name: str, version: int) -> LoadedModel:
        if version == 3:
            entered.set()
            release.wait(120)
        return LoadedModel.load(repository, name, version)

    manager = VersionManager(repository, poll_interval_s=0.1, loader=gated)
    manager.poll_once()
    repository.publish(colour_export, MODEL)
    manager.start()  # v2 active, v1 previous
    try:
        repository.publish(colour_export, MODEL)
        _wait_until(entered.is_set, "version 3 to start loading")
        repository.set_pin(MODEL, 1)
        _wait_until(lambda: manager.get(MODEL).version == 1, "the rollback during the load")
        release.set()
        _wait_until(lambda: _state(manager, 3) == VersionState.UNLOADED, "the load to end")
        (status,) = manager.status()
        assert (status.active_version, status.previous_version) == (1, 2)  # 3 was not swapped in
    finally:
        release.set()
        manager.stop()


def _state(manager: VersionManager, version: int) -> VersionState:
    (status,) = manager.status()
    return next(v.state for v in status.versions if v.version == version)


def test_label_count_must_equal_the_output_width(tmp_path: Path, colour_export: Path) -> None:
    export = tmp_path / "four-labels"
    shutil.copytree(colour_export, export)
    labels = [*COLOURS, "purple"]
    (export / "assets" / "labels.txt").write_text("".join(f"{x}\n" for x in labels))
    manifest = Manifest.read(export).model_copy(update={"labels": labels})
    manifest.model_copy(update={"files": hash_tree(export)}).write(export)
    repository = ModelRepository(tmp_path / "models")
    version = repository.publish(export, MODEL)
    with pytest.raises(RejectedModel, match="outputs 3 probabilities but the manifest has 4"):
        LoadedModel.load(repository, MODEL, version)


def test_signature_metadata_is_tf_serving_shaped(repository: ModelRepository) -> None:
    model = LoadedModel.load(repository, MODEL, 1)
    serving = model.signatures["serving_default"]
    assert serving["method_name"] == "tensorflow/serving/predict"
    assert serving["inputs"]["images"]["dtype"] == "DT_STRING"
    assert serving["outputs"]["score"]["dtype"] == "DT_FLOAT"
    assert json.loads(json.dumps(model.signatures)) == model.signatures  # plain JSON data

"""The promotion gate with real `graft train`, `publish`, `push` and `promote` runs and a real
`graft serve`: a retrain on shuffled labels is rejected and never served, a retrain on the real
folder is promoted and served, `--promote never` waits for an operator, `--promote always`
skips the gate, and bad gate options fail in one line before any work.

The trained models are shared: one training folder of coloured shapes, one copy of it with
shuffled labels, one held-out folder (other images of the same shapes), tiny settings.
"""

import json
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from support.server import RunningServer, running_server
from training_images import make_dataset
from typer.testing import CliRunner, Result

from graft_cli import app
from service.store.promotion import (
    PROMOTION_DIR,
    promotion_of,
    read_promotions,
    stable_version,
)
from service.store.repository import ModelRepository
from service.wire import PromotionState

pytestmark = pytest.mark.slow
MODEL = "shapes"
TOKEN = "promotion-test-token-0123"
ADMIN = {"authorization": f"Bearer {TOKEN}"}
ENV = {"GRAFT_ADMIN_TOKEN": TOKEN, "GRAFT_POLL_INTERVAL_S": "0.5"}
TINY = ["--image-size", "64", "--epochs", "2", "--fine-tune-epochs", "0", "--batch-size", "8"]
runner = CliRunner()


@dataclass(frozen=True)
class Folders:
    data: Path  # the real training folder
    shuffled: Path  # the same images, labels shuffled
    gate: Path  # held-out images, real labels
    root: Path  # the model repository the server serves
    tmp: Path


def _graft(*args: object) -> Result:
    return runner.invoke(app, [str(a) for a in args])


def _last_json(result: Result) -> dict:
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def _one_line_error(result: Result, *fragments: str) -> str:
    assert result.exit_code == 1, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def _train(folders: Folders, data: Path, *options: object) -> dict:
    report = folders.tmp / f"report-{len(list(folders.tmp.glob('report-*')))}"
    args = ("--model-root", folders.root, "--report-dir", report, "--quiet", *TINY, *options)
    return _last_json(_graft("train", data, "--name", MODEL, *args))


def _shuffled_copy(source: Path, target: Path, seed: int = 3) -> Path:
    """Every image of `source` under a class drawn at random (the class sizes kept)."""
    files = sorted(p for p in source.rglob("*") if p.is_file())
    classes = np.random.default_rng(seed).permutation([p.parent.name for p in files])
    for index, (path, label) in enumerate(zip(files, classes, strict=True)):
        (target / label).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target / label / f"{index:03d}{path.suffix}")
    kept = sum(p.parent.name == label for p, label in zip(files, classes, strict=True))
    assert kept < len(files) / 2, "the shuffle left most labels as they were"
    return target


def _until(condition: Callable[[], object], what: str, server: RunningServer, timeout_s=120.0):
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        assert time.monotonic() < deadline, f"{what} after {timeout_s:.0f} s:\n{server.log_tail()}"
        time.sleep(0.2)
    return value


def _versions(server: RunningServer) -> dict[int, dict]:
    """GET /models: the model's versions by number."""
    response = httpx.get(f"{server.http}/models", headers=ADMIN, timeout=30)
    assert response.status_code == 200, response.text
    model = next(m for m in response.json()["models"] if m["name"] == MODEL)
    return {v["version"]: v for v in model["versions"]}


def _promotion_seen(server: RunningServer, version: int, state: str) -> bool:
    """The server's poller has read `version` in `state` (GET /models shows its last poll)."""
    listed = _versions(server).get(version)
    return listed is not None and listed["promotion"]["state"] == state


def _metric(text: str, name: str, **labels: str) -> float | None:
    """The value of the series `name{labels}` in a /metrics scrape (any label order)."""
    for line in text.splitlines():
        match = re.match(rf"{name}{{(.*)}} (\S+)$", line)
        if match and dict(re.findall(r'(\w+)="([^"]*)"', match.group(1))) == labels:
            return float(match.group(2))
    return None


def _served(server: RunningServer, folders: Folders) -> set[int]:
    """The versions that answered /classify for a few held-out images naming no version."""
    images = sorted(folders.gate.rglob("*.png"))[:3]
    files = [("images", (p.name, p.read_bytes(), "image/png")) for p in images]
    answers = [httpx.post(f"{server.http}/classify", files=files, timeout=60) for _ in range(3)]
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    return {a.json()["version"] for a in answers}


# -- the shared folders, trainings and server --------------------------------------------------


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> Folders:
    tmp = tmp_path_factory.mktemp("promotion")
    data = make_dataset(tmp / "data", per_class=10, seed=0)
    return Folders(
        data=data,
        shuffled=_shuffled_copy(data, tmp / "shuffled"),
        gate=make_dataset(tmp / "gate", per_class=6, seed=11),
        root=tmp / "models",
        tmp=tmp,
    )


@pytest.fixture(scope="module")
def first(folders: Folders) -> dict:
    return _train(folders, folders.data)


@pytest.fixture(scope="module")
def server(folders: Folders, first: dict) -> Iterator[RunningServer]:
    with running_server(folders.root, default_model=MODEL, env=ENV) as running:
        yield running


@pytest.fixture(scope="module")
def shuffled_retrain(folders: Folders, server: RunningServer) -> dict:
    """A retrain on the shuffled copy, gated on the held-out folder, while the server runs."""
    return _train(folders, folders.shuffled, "--gate-data", folders.gate)


@pytest.fixture(scope="module")
def real_retrain(folders: Folders, server: RunningServer, shuffled_retrain: dict) -> dict:
    """A retrain on the real folder, gated on its own test split (the default)."""
    return _train(folders, folders.data)


# -- graft train -------------------------------------------------------------------------------


def test_the_first_version_is_promoted_when_it_beats_chance(first: dict) -> None:
    promotion = first["promotion"]
    assert promotion["state"] == "promoted" and promotion["decided_by"] == "gate", promotion
    gate = promotion["gate"]
    assert gate["source"] == "test split" and gate["active"] is None
    assert gate["candidate"]["version"] == first["version"] == 1
    assert gate["candidate"]["accuracy"] > gate["chance"]
    assert "first version" in promotion["reason"]


def test_a_retrain_on_shuffled_labels_is_rejected_and_never_served(
    folders: Folders, server: RunningServer, first: dict, shuffled_retrain: dict
) -> None:
    version, promotion = shuffled_retrain["version"], shuffled_retrain["promotion"]
    assert promotion["state"] == "rejected", promotion
    gate = promotion["gate"]
    assert gate["source"] == "gate data gate" and gate["images"] == 18
    assert gate["active"]["version"] == first["version"] and gate["max_regression"] == 0.01
    assert gate["candidate"]["accuracy"] < gate["active"]["accuracy"] - 0.01
    assert f"version {first['version']} serves on" in promotion["reason"]
    # The record lies beside the version, whose files still match its manifest.
    repository = ModelRepository(folders.root)
    repository.verify(MODEL, version)
    assert (folders.root / MODEL / PROMOTION_DIR / f"{version}.json").is_file()
    assert read_promotions(repository, MODEL)[version].state == PromotionState.REJECTED
    # The server has seen it, with the gate's figures, and serves the previous version on.
    _until(lambda: _promotion_seen(server, version, "rejected"), "the rejection seen", server)
    listed = _versions(server)[version]["promotion"]
    assert listed["gate"]["candidate"] == gate["candidate"]
    assert _served(server, folders) == {first["version"]}
    metrics = httpx.get(f"{server.http}/metrics", timeout=30).text
    state = {"model": MODEL, "version": str(version)}
    assert _metric(metrics, "graft_model_promotion", **state, state="rejected") == 1
    assert _metric(metrics, "graft_model_promotion", **state, state="candidate") == 0
    assert _metric(metrics, "graft_promotions_total", model=MODEL, outcome="rejected") == 1


def test_a_retrain_on_the_real_folder_is_promoted_and_served(
    folders: Folders, server: RunningServer, first: dict, real_retrain: dict
) -> None:
    version, promotion = real_retrain["version"], real_retrain["promotion"]
    assert promotion["state"] == "promoted", promotion
    gate = promotion["gate"]
    assert gate["source"] == "test split"
    assert gate["active"]["version"] == first["version"]  # the rejected one was never stable
    assert gate["candidate"]["accuracy"] >= gate["active"]["accuracy"] - 0.01
    _until(lambda: _served(server, folders) == {version}, "the promoted retrain served", server)
    assert stable_version(ModelRepository(folders.root), MODEL) == version


# -- graft push: the gate measures the active version through the server ------------------------


def test_push_measures_the_active_version_through_the_server(
    folders: Folders, server: RunningServer, shuffled_retrain: dict, real_retrain: dict
) -> None:
    repository = ModelRepository(folders.root)
    shuffled = repository.version_dir(MODEL, shuffled_retrain["version"])
    before = repository.versions(MODEL)
    url = ("--url", server.http)
    refused = _graft("push", shuffled, "--name", MODEL, *url, "--token", "wrong",
                     "--gate-data", folders.gate)  # fmt: skip
    _one_line_error(refused, "(401)")
    assert repository.versions(MODEL) == before  # nothing was uploaded
    pushed = _last_json(
        _graft(
            "push", shuffled, "--name", MODEL, *url, "--token", TOKEN, "--gate-data", folders.gate
        )
    )
    version, promotion = pushed["version"], pushed["promotion"]
    assert version == before[-1] + 1 and promotion["state"] == "rejected", promotion
    assert promotion["gate"]["active_measured_by"] == "server"
    assert promotion["gate"]["active"]["version"] == real_retrain["version"]
    assert promotion_of(read_promotions(repository, MODEL), version).state == "rejected"
    _until(lambda: _promotion_seen(server, version, "rejected"), "the pushed rejection", server)
    assert _served(server, folders) == {real_retrain["version"]}


# -- --promote never, then an operator ----------------------------------------------------------


def test_promote_never_keeps_a_candidate_until_an_operator_promotes_it(
    folders: Folders, server: RunningServer, real_retrain: dict
) -> None:
    repository = ModelRepository(folders.root)
    export = repository.version_dir(MODEL, real_retrain["version"])  # the active one's files
    publish = ("publish", export, "--name", MODEL, "--model-root", folders.root)
    published = _last_json(_graft(*publish, "--gate-data", folders.gate, "--promote", "never"))
    version, promotion = published["version"], published["promotion"]
    assert promotion["state"] == "candidate" and promotion["decided_by"] == "never"
    assert "the gate would promote it" in promotion["reason"]
    figures = promotion["gate"]  # the same network as the active version: the same figures
    assert figures["active"]["version"] == real_retrain["version"]
    for figure in ("accuracy", "macro_f1"):
        assert figures["candidate"][figure] == figures["active"][figure]
    _until(lambda: _promotion_seen(server, version, "candidate"), "the candidate seen", server)
    assert _served(server, folders) == {real_retrain["version"]}
    # Nobody without the token promotes anything.
    endpoint = f"{server.http}/models/{MODEL}/versions/{version}/promotion"
    for headers in ({}, {"authorization": "Bearer wrong"}):
        answer = httpx.put(endpoint, json={"state": "promoted"}, headers=headers, timeout=30)
        assert answer.status_code == 401, answer.text
    bad = httpx.put(endpoint, json={"state": "served"}, headers=ADMIN, timeout=30)
    assert bad.status_code == 400 and "state" in bad.json()["message"], bad.text
    assert promotion_of(read_promotions(repository, MODEL), version).state == "candidate"
    # The operator promotes it; the gate's figures stay on the record.
    promoted = _last_json(_graft("promote", MODEL, version, "--url", server.http, "--token", TOKEN))
    assert promoted["promotion"]["state"] == "promoted"
    assert promoted["promotion"]["decided_by"] == "operator"
    assert promoted["promotion"]["gate"] == figures
    _until(lambda: _served(server, folders) == {version}, "the promoted candidate served", server)
    assert httpx.get(f"{server.http}/livez", timeout=10).status_code == 200


# -- graft publish on a repository of its own ----------------------------------------------------


def test_publish_gates_with_held_out_images_or_refuses_to_guess(
    folders: Folders, first: dict, shuffled_retrain: dict, tmp_path: Path
) -> None:
    source = ModelRepository(folders.root)
    good = source.version_dir(MODEL, first["version"])
    bad = source.version_dir(MODEL, shuffled_retrain["version"])
    root = tmp_path / "models"
    repository = ModelRepository(root)
    publish = ("publish", "--name", "copy", "--model-root", root)

    # The first version, no held-out images: nothing to compare with.
    one = _last_json(_graft(*publish[:1], good, *publish[1:]))
    assert (one["version"], one["promotion"]["state"]) == (1, "promoted")
    assert "no --gate-data" in one["promotion"]["reason"]
    # A second one with nothing to measure on is refused before anything is published.
    _one_line_error(_graft(*publish[:1], good, *publish[1:]), "--gate-data", "--promote never")
    assert repository.versions("copy") == [1]
    # With held-out images: the shuffled model is rejected, the default stays on 1.
    two = _last_json(_graft(*publish[:1], bad, *publish[1:], "--gate-data", folders.gate))
    assert (two["version"], two["promotion"]["state"]) == (2, "rejected")
    assert two["promotion"]["gate"]["active"]["version"] == 1
    assert stable_version(repository, "copy") == 1
    # --promote always skips the gate, whatever the model.
    three = _last_json(_graft(*publish[:1], bad, *publish[1:], "--promote", "always"))
    assert three["promotion"]["state"] == "promoted"
    assert (three["promotion"]["decided_by"], three["promotion"]["gate"]) == ("always", None)
    assert stable_version(repository, "copy") == 3
    # A local operator's promotion of the rejected one.
    promoted = _last_json(_graft("promote", "copy", 2, "--model-root", root))
    assert promoted["promotion"]["state"] == "promoted"
    assert "it was rejected" in promoted["promotion"]["reason"]
    assert stable_version(repository, "copy") == 3  # the newest promoted one


def test_a_version_without_a_record_counts_as_promoted_and_an_unreadable_one_does_not(
    folders: Folders, first: dict, tmp_path: Path
) -> None:
    export = ModelRepository(folders.root).version_dir(MODEL, first["version"])
    repository = ModelRepository(tmp_path / "models")
    assert repository.publish(export, "old") == 1  # as before the gate: no record
    assert promotion_of(read_promotions(repository, "old"), 1).state == "promoted"
    assert stable_version(repository, "old") == 1
    record = tmp_path / "models" / "old" / PROMOTION_DIR / "1.json"
    record.parent.mkdir()
    record.write_text('{"state": "promoted", "decided_by": "nobody"')
    unreadable = promotion_of(read_promotions(repository, "old"), 1)
    assert unreadable.state == "candidate" and "unreadable" in unreadable.reason
    assert stable_version(repository, "old") is None
    repository.verify("old", 1)  # the record is not one of the version's files


# -- bad gate options: one line, before any work ---------------------------------------------


@pytest.mark.parametrize(
    ("options", "fragments"),
    [
        (["--max-regression", "1.5"], ["--max-regression must be 0 to 1", "1.5"]),
        (["--max-regression", "-0.1"], ["--max-regression must be 0 to 1", "-0.1"]),
        (["--gate-data", "{missing}"], ["--gate-data", "does not exist"]),
        (["--gate-data", "{empty}"], ["--gate-data", "no class sub-folders"]),
        (["--gate-data", "{hexagons}"], ["--gate-data", "hexagon", "does not have"]),
    ],
)
@pytest.mark.parametrize("command", ["train", "publish", "push"])
def test_bad_gate_options_fail_in_one_line_and_publish_nothing(
    command: str, options: list[str], fragments: list[str], folders: Folders, first: dict,
    tmp_path: Path,
) -> None:  # fmt: skip
    (tmp_path / "empty").mkdir()
    make_dataset(tmp_path / "hexagons", per_class=2, classes=("circle", "square"))
    (tmp_path / "hexagons" / "square").rename(tmp_path / "hexagons" / "hexagon")
    places = {k: str(tmp_path / k) for k in ("missing", "empty", "hexagons")}
    options = [o.format(**places) for o in options]
    root = tmp_path / "models"
    export = ModelRepository(folders.root).version_dir(MODEL, first["version"])
    if command == "train":
        args = ["train", folders.data, "--name", MODEL, "--model-root", root, *TINY,
                "--report-dir", tmp_path / "report"]  # fmt: skip
    elif command == "publish":
        args = ["publish", export, "--name", MODEL, "--model-root", root]
    else:  # nothing listens on port 9: the options must fail before any connection
        args = ["push", export, "--name", MODEL, "--url", "http://127.0.0.1:9", "--token", "t"]
    _one_line_error(_graft(*args, *options), *fragments)
    assert not (root / MODEL).exists()


# -- the metrics, from what each poll reads -------------------------------------------------------


def test_the_serving_side_counts_the_decisions_it_sees_being_made() -> None:
    from prometheus_client import REGISTRY

    from service.runtime.promotion_metrics import PromotionMetrics
    from service.wire import Promotion

    def record(state: PromotionState) -> Promotion:
        return Promotion(state=state, decided_by="gate", reason="measured")

    def total(outcome: str) -> float:
        labels = {"model": "counted", "outcome": outcome}
        return REGISTRY.get_sample_value("graft_promotions_total", labels) or 0.0

    def gauge(version: int, state: str) -> float | None:
        labels = {"model": "counted", "version": str(version), "state": state}
        return REGISTRY.get_sample_value("graft_model_promotion", labels)

    rejected, promoted = record(PromotionState.REJECTED), record(PromotionState.PROMOTED)
    watch = PromotionMetrics()
    watch.observe("counted", [1, 2], {2: rejected})  # what the first poll finds: no decision
    assert (total("rejected"), gauge(1, "promoted"), gauge(2, "rejected")) == (0, 1, 1)
    watch.observe("counted", [1, 2, 3], {2: rejected, 3: record(PromotionState.CANDIDATE)})
    assert gauge(3, "candidate") == 1 and total("promoted") == 0
    watch.observe("counted", [1, 2, 3], {2: rejected, 3: promoted})
    watch.observe("counted", [1, 2, 3, 4], {2: rejected, 3: promoted, 4: rejected})
    watch.observe("counted", [1, 2, 3, 4], {2: rejected, 3: promoted, 4: rejected})
    assert (total("promoted"), total("rejected")) == (1, 1)
    assert (gauge(3, "candidate"), gauge(3, "promoted")) == (0, 1)
    watch.observe("counted", [1, 2, 4, 5], {2: rejected, 4: rejected})  # 3 deleted, 5 unrecorded
    assert gauge(3, "promoted") == 0 and gauge(5, "promoted") == 1
    assert total("promoted") == 1  # a version published as before the gate is no decision

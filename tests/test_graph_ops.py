"""The op allowlist: graft's own exports pass, anything else in a graph is refused, on a push
and on a load from the volume (the retrain CronJob's path), before the graph runs.

Hostile graphs are real SavedModels (tf.saved_model.save of a tf.Module) with the labels file
and a manifest, so that only their ops are wrong.
"""

import logging
from collections.abc import Callable
from pathlib import Path

import pytest
from support.exports import make_tiny_export, raw_saved_model

from service.errors import RejectedModel
from service.runtime.graph_ops import ALLOWED, AllowedOps, GraphOps, graph_ops, refuse_unlisted_ops
from service.runtime.versions import VersionManager
from service.store.layout import SAVED_MODEL_FILE
from service.store.manifest import Manifest, hash_tree
from service.store.repository import ModelRepository
from service.wire import VersionState

LABELS = ["a", "b"]


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_export(tmp_path_factory.mktemp("ops") / "tiny", LABELS)


def hostile(folder: Path, build: Callable[[Path], object]) -> Path:
    """Save the tf.Module `build(folder)` returns (its `serve` as serving_default), with a
    labels file and a manifest."""
    import tensorflow as tf

    module = build(folder)
    tf.saved_model.save(module, str(folder), signatures={"serving_default": module.serve})
    (folder / "assets").mkdir(exist_ok=True)
    (folder / "assets/labels.txt").write_text("".join(f"{label}\n" for label in LABELS))
    Manifest(backbone="raw", image_size=8, labels=LABELS, files=hash_tree(folder)).write(folder)
    return folder


def _half(images: object) -> object:
    import tensorflow as tf

    return tf.fill([tf.shape(images)[0], 2], 0.5)


def writes_a_file(planted: Path) -> Callable[[object], object]:
    def outputs(images: object) -> object:
        import tensorflow as tf

        with tf.control_dependencies([tf.io.write_file(str(planted), images[0])]):
            return _half(images)

    return outputs


def reads_a_file(images: object) -> object:
    import tensorflow as tf

    secret = tf.io.read_file("/proc/self/environ")
    return _half(images) + 0.0 * tf.cast(tf.strings.length(secret), tf.float32)


def calls_save(images: object) -> object:
    import tensorflow as tf

    save = tf.raw_ops.SaveV2(
        prefix="/tmp/graft-hostile", tensor_names=["x"], shape_and_slices=[""], tensors=[images]
    )
    with tf.control_dependencies([save]):
        return _half(images)


def runs_a_dataset(images: object) -> object:
    import tensorflow as tf

    total = tf.data.Dataset.range(3).reduce(tf.constant(0, tf.int64), lambda x, y: x + y)
    return _half(images) + 0.0 * tf.cast(total, tf.float32)


def table_module(folder: Path) -> object:
    """A lookup table filled from a text file: its initialiser runs when the model LOADS."""
    import tensorflow as tf

    source = folder.parent / f"{folder.name}-vocabulary.txt"
    source.write_text("x\ny\n")

    class Module(tf.Module):
        def __init__(self) -> None:
            initializer = tf.lookup.TextFileInitializer(
                str(source),
                tf.string,
                tf.lookup.TextFileIndex.WHOLE_LINE,
                tf.int64,
                tf.lookup.TextFileIndex.LINE_NUMBER,
            )
            self.table = tf.lookup.StaticHashTable(initializer, default_value=-1)

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="images")])
        def serve(self, images: tf.Tensor) -> dict[str, tf.Tensor]:
            ids = tf.cast(self.table.lookup(images), tf.float32)
            probabilities = _half(images) + 0.0 * ids[:, None]
            return {
                "probabilities": probabilities,
                "label": tf.gather(tf.constant(LABELS), tf.argmax(probabilities, axis=-1)),
                "score": tf.reduce_max(probabilities, axis=-1),
            }

    return Module()


# -- graft's own graphs --------------------------------------------------------------------------


def test_a_real_export_passes_and_its_checkpoint_ops_stay_in_the_saver(export_dir: Path) -> None:
    refuse_unlisted_ops(export_dir)
    ops = graph_ops(export_dir / SAVED_MODEL_FILE)
    assert {"SaveV2", "RestoreV2", "MergeV2Checkpoints"} <= ops.saver_only
    assert not {"SaveV2", "RestoreV2", "MergeV2Checkpoints"} & ops.elsewhere
    assert {"DecodeImage", "ScaleAndTranslate"} <= ops.elsewhere  # preprocess is in the list
    assert not ALLOWED.serving & ALLOWED.saving


@pytest.mark.slow
def test_the_committed_list_is_what_every_backbone_export_contains() -> None:
    """The allowlist is generated: regenerate it (python -m training.allowed_ops) when this
    fails after a backbone, the export or TensorFlow changed."""
    from training.allowed_ops import ALLOWED_OPS_FILE, current_ops, render

    assert ALLOWED_OPS_FILE.read_text(encoding="ascii") == render(current_ops())


# -- hostile graphs ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("outputs", "named"),
    [
        (reads_a_file, "ReadFile"),
        (runs_a_dataset, "ReduceDataset"),
        (calls_save, "checkpoint ops outside the saver's own functions: SaveV2"),
    ],
    ids=["ReadFile", "dataset", "SaveV2 in a signature"],
)
def test_a_graph_with_an_op_graft_never_exports_is_refused(
    tmp_path: Path, outputs: Callable[[object], object], named: str
) -> None:
    folder = raw_saved_model(tmp_path / "raw", LABELS, outputs)
    with pytest.raises(RejectedModel, match=named):
        refuse_unlisted_ops(folder)


def test_a_table_initialiser_that_reads_a_file_at_load_is_refused(tmp_path: Path) -> None:
    folder = hostile(tmp_path / "table", table_module)
    ops = graph_ops(folder / SAVED_MODEL_FILE)
    assert "InitializeTableFromTextFileV2" in ops.elsewhere, "the initialiser was not seen"
    with pytest.raises(RejectedModel, match="InitializeTableFromTextFileV2"):
        refuse_unlisted_ops(folder)


def test_a_hostile_version_published_through_the_volume_fails_at_load_and_never_runs(
    tmp_path: Path, export_dir: Path
) -> None:
    planted = tmp_path / "planted"
    repository = ModelRepository(tmp_path / "models")
    repository.publish(export_dir, "m")
    # The retrain CronJob's path: straight into the volume, no push gate.
    repository.publish(raw_saved_model(tmp_path / "raw", LABELS, writes_a_file(planted)), "m")
    manager = VersionManager(repository, poll_interval_s=60)
    manager.poll_once()  # v2, the newest, fails
    manager.poll_once()  # so the newest good one, v1, loads
    (status,) = manager.status()
    states = {v.version: (v.state, v.reason or "") for v in status.versions}
    assert states[2][0] == VersionState.FAILED and "WriteFile" in states[2][1]
    assert manager.get("m").version == 1, "the good version keeps serving"
    assert not planted.exists(), "the hostile graph ran"


def test_a_version_failed_by_the_op_check_is_logged_as_an_error_now_and_after_a_restart(
    tmp_path: Path, export_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    repository = ModelRepository(tmp_path / "models")
    repository.publish(export_dir, "m")
    repository.publish(
        raw_saved_model(tmp_path / "raw", LABELS, writes_a_file(tmp_path / "x")), "m"
    )

    def failed_logs() -> list[logging.LogRecord]:
        messages = [(r, r.getMessage()) for r in caplog.records]
        return [r for r, text in messages if "version 2 FAILED" in text and "WriteFile" in text]

    with caplog.at_level(logging.INFO, logger="graft.manager"):
        VersionManager(repository, poll_interval_s=60).poll_once()  # the op check fails v2
        assert [r.levelno for r in failed_logs()] == [logging.ERROR]
        caplog.clear()
        restarted = VersionManager(repository, poll_interval_s=60)  # reads the load records
        restarted.poll_once()
        assert [r.levelno for r in failed_logs()] == [logging.ERROR], "a restart hid it"
        assert "earlier process" in failed_logs()[0].getMessage()
    assert restarted.get("m").version == 1


def test_refusals_name_unknown_ops_and_misplaced_checkpoint_ops() -> None:
    checkpoint = frozenset({"SaveV2", "MergeV2Checkpoints"})
    allowed = AllowedOps(frozenset({"Const", "MatMul"}), checkpoint)
    assert allowed.refusals(GraphOps(frozenset({"Const"}), frozenset({"SaveV2"}))) == []
    problems = allowed.refusals(
        GraphOps(
            frozenset({"Const", "DatasetFromGraph", "MergeV2Checkpoints", "RpcCall"}),
            frozenset({"InitializeTableFromTextFile"}),
        )
    )
    assert problems == [
        "ops graft's exports never contain: DatasetFromGraph, RpcCall, InitializeTableFromTextFile",
        "checkpoint ops outside the saver's own functions: MergeV2Checkpoints",
    ]


def test_a_file_that_is_no_saved_model_is_refused(tmp_path: Path) -> None:
    (tmp_path / SAVED_MODEL_FILE).write_bytes(b"\xff" * 64)
    with pytest.raises(RejectedModel, match="not a SavedModel protobuf"):
        refuse_unlisted_ops(tmp_path)

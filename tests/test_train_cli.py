"""`graft train` / `graft evaluate` through the real CLI: bad input, then a tiny end-to-end run
that publishes a real SavedModel into a model repository and evaluates it."""

import json
import sys
from pathlib import Path

import pytest
from training_images import SHAPES, make_dataset
from typer.testing import CliRunner, Result

from graft_cli import app
from service.store.repository import ModelRepository

runner = CliRunner()
TINY = ["--image-size", "64", "--epochs", "2", "--fine-tune-epochs", "1", "--batch-size", "8"]


def _graft(*args: str) -> Result:
    return runner.invoke(app, [str(a) for a in args])


def _last_json(result: Result) -> dict:
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def _assert_one_line_error(result: Result, fragment: str) -> None:
    assert result.exit_code == 1
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert fragment in lines[0]
    assert "Traceback" not in result.stderr + result.stdout


def _bad_folder(kind: str, tmp_path: Path) -> Path:
    root = tmp_path / "data"
    if kind == "file":
        root.write_bytes(b"\xff\xd8\xff not a folder")
    elif kind == "empty":
        root.mkdir()
    elif kind == "one_class":
        make_dataset(root, per_class=4, classes=("circle",))
    elif kind == "only_corrupt":
        for name in ("a", "b"):
            (root / name).mkdir(parents=True)
            (root / name / "x.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
            (root / name / "y.png").write_text("text")
    return root


@pytest.mark.parametrize(
    ("kind", "fragment"),
    [
        ("missing", "does not exist"),
        ("file", "is not a folder"),
        ("empty", "no class sub-folders"),
        ("one_class", "only one class"),
        ("only_corrupt", "no readable images"),
    ],
)
def test_train_refuses_bad_folders_in_one_line(kind: str, fragment: str, tmp_path: Path) -> None:
    root = _bad_folder(kind, tmp_path)
    result = _graft("train", root, "--name", "m", "--model-root", tmp_path / "models", *TINY)
    _assert_one_line_error(result, fragment)
    assert not (tmp_path / "models" / "m").exists()


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--name", "Bad Name"], "invalid model name"),
        (["--name", "m", "--backbone", "vgg99"], "unknown backbone"),
        (["--name", "m", "--epochs", "0"], "--epochs must be at least 1"),
        (["--name", "m", "--runtime", "tpu"], "--runtime='tpu' is not a runtime"),
        (["--name", "m", "--image-size", "30000"], "--image-size must be 32 to 1024, got 30000"),
        (["--name", "m", "--image-size", "16"], "--image-size must be 32 to 1024, got 16"),
    ],
)
def test_train_refuses_bad_options_in_one_line(
    args: list[str], fragment: str, tmp_path: Path
) -> None:
    root = make_dataset(tmp_path / "data", per_class=2)
    result = _graft("train", root, "--model-root", tmp_path / "models", *args)
    _assert_one_line_error(result, fragment)


def test_train_reads_the_runtime_from_graft_runtime(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "data", per_class=2)
    args = ["train", str(root), "--name", "m", "--model-root", str(tmp_path / "models")]
    result = runner.invoke(app, args, env={"GRAFT_RUNTIME": "tpu"})
    _assert_one_line_error(result, "'tpu' is not a runtime")


def test_train_refuses_a_named_runtime_that_is_not_installed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what Python reports when absent
    root = make_dataset(tmp_path / "data", per_class=2)
    models = tmp_path / "models"
    result = _graft(
        "train", root, "--name", "m", "--model-root", models, "--runtime", "onnxruntime"
    )
    _assert_one_line_error(result, "onnxruntime package is not installed")
    assert not (models / "m").exists()


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    tmp = tmp_path_factory.mktemp("e2e")
    data = make_dataset(tmp / "data", per_class=8)
    (data / "circle" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut short")
    result = _graft(
        "train", data, "--name", "shapes", "--model-root", tmp / "models",
        "--report-dir", tmp / "report", "--quiet", *TINY,
    )  # fmt: skip
    assert result.stderr.count("\n") <= 2, result.stderr  # --quiet: at most the skip warning
    return data, tmp, _last_json(result)


def test_train_publishes_a_version_and_reports(trained: tuple[Path, Path, dict]) -> None:
    _, tmp, out = trained
    assert (out["name"], out["version"]) == ("shapes", 1)
    assert set(out["metrics"]) >= {"accuracy", "macro_f1", "top_k_accuracy"}
    assert 0.0 <= out["metrics"]["accuracy"] <= 1.0 and out["seconds"] > 0
    repository = ModelRepository(tmp / "models")
    manifest = repository.verify("shapes", 1)
    assert manifest.labels == ["circle", "square", "triangle"] and manifest.image_size == 64
    assert manifest.dataset_fingerprint == out["dataset_fingerprint"]
    # The default runtime (auto) ran the feature cache on ONNX Runtime, and graft.json says so.
    training = manifest.metrics["training"]
    assert training == out["metrics"]["training"] and training["feature_runtime"] == "onnxruntime"
    assert 0 <= training["feature_max_abs_diff"] < 1e-3
    assert out["timings"]["feature_runtime"] == "onnxruntime"
    assert Path(out["path"]) == repository.version_dir("shapes", 1)
    report = tmp / "report"
    for name in ("metrics.json", "confusion_matrix.json", "confusion_matrix.png", "curves.png"):
        assert (report / name).stat().st_size > 0, name
    split = json.loads((report / "split.json").read_text())
    assert len(split["train"]) + len(split["val"]) + len(split["test"]) == 24
    assert (report / "checkpoints" / "phase1_head.keras").is_file()


def test_train_calibrates_the_scores_it_publishes(trained: tuple[Path, Path, dict]) -> None:
    import numpy as np
    import tensorflow as tf

    from training.calibration import expected_calibration_error

    data, tmp, out = trained
    calibration = out["metrics"]["calibration"]
    assert calibration["fitted_on"] == "validation split" and calibration["bins"] == 15
    assert 0.05 <= calibration["temperature"] <= 20
    report = tmp / "report"
    assert json.loads((report / "metrics.json").read_text())["calibration"] == calibration
    assert (report / "reliability.png").stat().st_size > 0
    # The published model carries the temperature: its scores on the test split have the
    # calibrated ECE the run recorded (the test images that decode; the broken one is skipped).
    test = json.loads((report / "split.json").read_text())["test"]
    version_dir = ModelRepository(tmp / "models").version_dir("shapes", 1)
    serve = tf.saved_model.load(str(version_dir)).signatures["serving_default"]
    images = [(data / row["path"]).read_bytes() for row in test]
    served = serve(images=tf.constant(images))["probabilities"].numpy()
    labels = np.array([row["label"] for row in test])
    ece = expected_calibration_error(served, labels)
    assert ece == pytest.approx(calibration["ece_after"], abs=2e-3)


def test_train_fits_the_ood_flag_it_publishes(trained: tuple[Path, Path, dict]) -> None:
    import numpy as np
    import tensorflow as tf

    data, tmp, out = trained
    report = tmp / "report"
    ood = json.loads((report / "metrics.json").read_text())["ood"]
    split = json.loads((report / "split.json").read_text())
    assert ood["method"] == "mahalanobis" and ood["percentile"] == 99.0
    assert len(ood["validation_scores"]) == len(split["val"])
    # The threshold's scores: the validation images and one augmented view of each (--views 2)
    assert ood["calibration_count"] == 2 * len(split["val"])
    assert len(ood["test_scores"]) == len(split["test"])
    assert ood["validation_flagged_rate"] <= 0.5  # the 99th percentile of a few images
    summary = out["metrics"]["ood"]
    assert summary["threshold"] == ood["threshold"] and "test_scores" not in summary
    manifest = ModelRepository(tmp / "models").verify("shapes", 1)
    assert manifest.ood is not None and manifest.ood.threshold == ood["threshold"]
    assert summary["calibration_count"] == manifest.metrics["ood"]["calibration_count"]
    assert summary["calibration_count"] == ood["calibration_count"]
    # The published graph scores the test images as training did (the same features).
    version_dir = ModelRepository(tmp / "models").version_dir("shapes", 1)
    serve = tf.saved_model.load(str(version_dir)).signatures["serving_default"]
    images = [(data / row["path"]).read_bytes() for row in split["test"]]
    served = serve(images=tf.constant(images))
    np.testing.assert_allclose(served["ood_score"].numpy(), ood["test_scores"], rtol=2e-3)
    assert (
        served["in_distribution"].numpy() == (served["ood_score"].numpy() <= ood["threshold"])
    ).all()


def test_evaluate_prints_parseable_metrics(trained: tuple[Path, Path, dict]) -> None:
    data, tmp, _ = trained
    result = _graft(
        "evaluate", data, "--name", "shapes", "--model-root", tmp / "models",
        "--report-dir", tmp / "evaluation",
    )  # fmt: skip
    out = _last_json(result)
    assert out["version"] == 1 and out["labels"] == ["circle", "square", "triangle"]
    assert sum(map(sum, out["confusion_matrix"])) == 24  # every readable image, broken.jpg skipped
    assert {c["support"] for c in out["per_class"].values()} == {8}
    assert 0.0 <= out["accuracy"] <= 1.0 and 0.0 <= out["macro_f1"] <= 1.0
    assert "broken.jpg" in result.stderr  # the skip is reported, not fatal
    assert (tmp / "evaluation" / "confusion_matrix.png").is_file()


def test_evaluate_refuses_unknown_classes_and_versions(trained: tuple[Path, Path, dict]) -> None:
    _, tmp, _ = trained
    other = make_dataset(tmp / "other", per_class=2, classes=("circle", "square"))
    (other / "square").rename(other / "hexagon")
    root = tmp / "models"
    result = _graft("evaluate", other, "--name", "shapes", "--model-root", root)
    _assert_one_line_error(result, "hexagon")
    result = _graft("evaluate", other, "--name", "shapes", "--model-root", root, "--version", "7")
    assert result.exit_code == 1 and result.stderr.startswith("error: ")


def test_evaluate_defaults_to_the_served_version_not_the_newest(tmp_path: Path) -> None:
    from support.exports import make_tiny_export

    from service.store.promotion import publish_candidate
    from service.wire import Promotion, PromotionState

    data = make_dataset(tmp_path / "data", per_class=2)
    export = make_tiny_export(tmp_path / "export", labels=tuple(SHAPES))
    repository = ModelRepository(tmp_path / "models")
    repository.publish(export, "shapes")  # v1: promoted, served
    rejected = Promotion(state=PromotionState.REJECTED, decided_by="gate", reason="worse")
    publish_candidate(repository, export, "shapes", rejected)  # v2: newest, never served

    def evaluated() -> int:
        result = _graft("evaluate", data, "--name", "shapes", "--model-root", repository.root)
        return _last_json(result)["version"]

    assert evaluated() == 1
    repository.set_pin("shapes", 2)  # a pin serves v2: evaluated by default too
    assert evaluated() == 2
    assert "promoted" in _graft("evaluate", "--help").stdout


def test_mixed_precision_trains_in_float16_and_exports_float32(tmp_path: Path) -> None:
    import keras
    import tensorflow as tf

    from service.runtime.loaded_model import LoadedModel
    from service.runtime.networks import Engine

    data = make_dataset(tmp_path / "data", per_class=6)
    models = tmp_path / "models"
    result = _graft(
        "train", data, "--name", "mixed", "--model-root", models, "--quiet",
        "--mixed-precision", *TINY,
    )  # fmt: skip
    out = _last_json(result)
    assert out["metrics"]["training"]["precision"] == "mixed_float16"
    assert keras.mixed_precision.global_policy().name == "float32"  # restored after training
    repository = ModelRepository(models)
    version_dir = repository.version_dir("mixed", 1)
    serve = tf.saved_model.load(str(version_dir)).signatures["serving_default"]
    image = (data / "circle" / sorted(p.name for p in (data / "circle").iterdir())[0]).read_bytes()
    probabilities = serve(images=tf.constant([image]))["probabilities"]
    assert probabilities.dtype == tf.float32
    # The float32 export runs on ONNX Runtime within the agreement check's 1e-4.
    assert LoadedModel.load(repository, "mixed", 1, Engine("onnxruntime", 1)).runtime == (
        "onnxruntime"
    )

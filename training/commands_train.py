"""`graft train` and `graft evaluate`.

Both print progress and a short table on stderr and, as the LAST line on stdout, one JSON
object that other tools parse. Bad input (missing folder, one class, nothing readable, bad
name) ends with exit code 1 and a one-line `error: ...` on stderr, never a traceback.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from training.cli_errors import one_line_errors
from training.defaults import (
    DEFAULT_BACKBONE,
    DEFAULT_BATCH_SIZE,
    DEFAULT_RUNTIME,
    GPU_BATCH_SIZE,
    default_batch_size,
)
from training.gate_options import (
    DEFAULT_MAX_REGRESSION,
    GateData,
    MaxRegression,
    Promote,
    PromoteMode,
)

if TYPE_CHECKING:
    import keras
    import numpy as np

    from training.backbones import BackboneSpec
    from training.fit import FitResult
    from training.gate import GateSet
    from training.model import Classifier
    from training.ood import OodDetector
    from training.progress import Reporter
    from training.scan import Dataset, Sample
    from training.split import Split

DEFAULT_IMAGE_SIZE = 224
DEFAULT_EPOCHS = 15
DEFAULT_FINE_TUNE_EPOCHS = 5
DEFAULT_HIDDEN_UNITS = 256


def _default_report_dir(name: str, what: str) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return Path("reports") / f"{name}-{what}-{stamp}"


def _scan(data_dir: Path, work_dir: Path, reporter: Reporter, *, for_training: bool) -> Dataset:
    from training.scan import scan

    with reporter.task("scan", transient=True) as task:
        dataset = scan(
            data_dir,
            work_dir,
            for_training=for_training,
            on_total=task.set_total,
            on_progress=task.advance,
        )
    if dataset.rejected:
        reporter.info(f"warning: {dataset.rejected_summary()}")
    return dataset


@dataclass
class TrainOptions:
    data_dir: Path
    name: str
    model_root: Path
    backbone: str
    image_size: int | None
    epochs: int
    fine_tune_epochs: int
    fine_tune_layers: int | None
    batch_size: int
    max_per_class: int | None
    seed: int
    report_dir: Path | None
    augment: bool
    cache: bool
    views: int
    weights: str
    quiet: bool
    hidden_units: int = DEFAULT_HIDDEN_UNITS
    runtime: str = DEFAULT_RUNTIME
    mixed_precision: bool = False
    promote: str = "gated"  # the promotion gate (training/gate.py): gated | always | never
    gate_data: Path | None = None  # held-out class folders; None: the test split
    max_regression: float = 0.01


def run_train(options: TrainOptions) -> dict:
    """Scan -> split -> fit -> evaluate -> export -> publish; returns the result object."""
    from service.store.repository import validate_name
    from training.backbones import get_backbone
    from training.error_report import write_training_report
    from training.progress import Reporter
    from training.report import print_summary, write_report

    started = time.perf_counter()
    validate_name(options.name)
    spec = get_backbone(options.backbone)
    reporter = Reporter(options.quiet)
    report_dir = options.report_dir or _default_report_dir(options.name, "train")
    timings: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="graft-train-") as tmp:
        t = time.perf_counter()
        dataset, parts = _scan_and_split(options, Path(tmp) / "reencoded", report_dir, reporter)
        gate_set = _gate_set(options, dataset, parts, Path(tmp) / "gate", reporter)
        timings["scan"] = time.perf_counter() - t
        reporter.info(
            f"{len(dataset.classes)} classes, {len(dataset.samples)} images: "
            f"train {len(parts.train)}, val {len(parts.val)}, test {len(parts.test)}"
        )
        classifier, result = _fit(options, spec, dataset, parts, report_dir, reporter)
        timings["feature_runtime"] = result.feature_runtime
        timings["phase1"] = result.phase1.to_json()
        timings["phase2"] = result.phase2.to_json() if result.phase2 else None
        t = time.perf_counter()
        test_features, test = _embed(classifier, result, parts.test, options, reporter)
        metrics = _test_metrics(test, parts, dataset.classes)
        timings["evaluate"] = time.perf_counter() - t
        t = time.perf_counter()
        temperature, calibration, bins = _calibrate(
            classifier, result, parts, test, options, reporter
        )
        metrics["calibration"] = calibration
        timings["calibrate"] = time.perf_counter() - t
        t = time.perf_counter()
        detector, metrics["ood"] = _fit_ood(
            classifier, result, parts, test_features, options, reporter
        )
        # + the trained features' pass over the cache, which `fit` ran
        timings["ood"] = time.perf_counter() - t + (result.trained.seconds if result.trained else 0)
        histories = {"phase 1": result.phase1.history}
        if result.phase2:
            histories["phase 2"] = result.phase2.history
        files = write_report(report_dir, metrics, histories, bins)
        print_summary(reporter.console, metrics, f"test split ({options.name})")
        t = time.perf_counter()
        precision = "mixed_float16" if options.mixed_precision else "float32"
        training = {**result.training_info(), "precision": precision}
        summary = _summary(options, metrics, len(parts.train), training)
        model = _calibrated_model(classifier, temperature)
        # The gate measures the candidate in memory (the calibration keeps every top-1).
        predict = partial(_predict, classifier, result, options=options, reporter=reporter)
        version, version_dir, promotion = _publish(
            options, classifier, model, dataset, summary, Path(tmp), detector, gate_set, reporter,
            predict,
        )  # fmt: skip
        timings["export"] = time.perf_counter() - t
        t = time.perf_counter()
        # Inside `tmp`: the report's images are the scan's re-encodes where there are some.
        write_training_report(
            report_dir, f"{options.name} v{version}", metrics, files, dataset, parts, test,
            temperature, version_dir, _view_one(result, len(parts.train)), test_features,
            reporter,
        )  # fmt: skip
        timings["report_html"] = time.perf_counter() - t
    (report_dir / "timings.json").write_text(json.dumps(timings, indent=2))
    return {
        "name": options.name,
        "version": version,
        "path": str(version_dir),
        "promotion": promotion,
        "metrics": summary,
        "seconds": round(time.perf_counter() - started, 3),
        "report_dir": str(report_dir),
        "report": files,
        "dataset_fingerprint": dataset.fingerprint,
        "timings": timings,
    }


def _scan_and_split(
    options: TrainOptions, work_dir: Path, report_dir: Path, reporter: Reporter
) -> tuple[Dataset, Split]:
    """The training folder scanned and split; the split is written to the report folder."""
    from training.split import split

    dataset = _scan(options.data_dir, work_dir, reporter, for_training=True)
    parts = split(dataset, seed=options.seed, max_per_class=options.max_per_class)
    parts.write(dataset, report_dir / "split.json")
    return dataset, parts


def _fit(
    options: TrainOptions,
    spec: BackboneSpec,
    dataset: Dataset,
    parts: Split,
    report_dir: Path,
    reporter: Reporter,
) -> tuple[Classifier, FitResult]:
    """Build the classifier on the pretrained backbone and train it in two phases (under
    mixed precision when asked)."""
    from training.augment import AugmentConfig, build_augmenter
    from training.fit import fit
    from training.fit_config import FitConfig
    from training.model import build_classifier
    from training.precision import mixed_precision

    image_size = options.image_size or DEFAULT_IMAGE_SIZE
    weights = None if options.weights.lower() == "none" else options.weights
    config = FitConfig(
        epochs=options.epochs,
        fine_tune_epochs=options.fine_tune_epochs,
        fine_tune_layers=options.fine_tune_layers
        if options.fine_tune_layers is not None
        else spec.fine_tune_layers,
        batch_size=options.batch_size,
        cache_features=options.cache,
        views=options.views,
        seed=options.seed,
        checkpoint_dir=report_dir / "checkpoints",
        runtime=options.runtime,
    )
    augment = build_augmenter(AugmentConfig(), options.seed) if options.augment else None
    with mixed_precision(options.mixed_precision):
        classifier = build_classifier(
            spec.build(weights=weights, image_size=image_size),
            len(dataset.classes),
            image_size=image_size,
            backbone=spec.name,
            hidden_units=options.hidden_units,
            seed=options.seed,
        )
        return classifier, fit(classifier, parts.train, parts.val, config, augment, reporter)


def _predict(
    classifier: Classifier,
    result: FitResult,
    samples: list[Sample],
    options: TrainOptions,
    reporter: Reporter,
) -> np.ndarray:
    """The trained model's probabilities for `samples`, through the training input pipeline:
    the frozen part on the feature cache's runtime when it stayed frozen, else on Keras."""
    from training.evaluate import predict_keras

    if result.predict is not None:
        return result.predict(samples, reporter)
    return predict_keras(classifier, samples, options.batch_size, reporter)


def _embed(
    classifier: Classifier,
    result: FitResult,
    samples: list[Sample],
    options: TrainOptions,
    reporter: Reporter,
    augment: Callable | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The trained model's pooled features and probabilities for `samples` (or one augmented
    view of each, with `augment`), in one pass: as `_predict`, the frozen part on the
    feature cache's runtime when it stayed frozen."""
    from training.evaluate import embed_keras

    if result.embed is not None:
        return result.embed(samples, reporter, augment)
    return embed_keras(classifier, samples, options.batch_size, reporter, augment)


def _fit_ood(
    classifier: Classifier,
    result: FitResult,
    parts: Split,
    test_features: np.ndarray,
    options: TrainOptions,
    reporter: Reporter,
) -> tuple[OodDetector | None, dict]:
    """The out-of-distribution score fitted on the trained model's features of the training
    images (every cached view), thresholded on the validation split and its augmented views,
    judged on the test split: the detector (None: no validation images) and what
    metrics.json records."""
    import numpy as np

    from training import ood

    if not parts.val:
        return None, {"skipped": "the validation split is empty"}
    trained = result.trained
    if trained is None or trained.val is None:  # no feature cache: a pass over the pixels
        train, _ = _embed(classifier, result, parts.train, options, reporter)
        val, _ = _embed(classifier, result, parts.val, options, reporter)
        labels = np.array([s.label for s in parts.train])
    else:
        train, labels, val = trained.train, trained.train_labels, trained.val
    val_views = _val_views(classifier, result, parts.val, options, reporter)
    detector, val_scores = ood.fit_detector(train, labels, val, val_views=val_views)
    return detector, ood.record(detector, val_scores, ood.scores(detector.layer, test_features))


# Seeds the validation views' augmentation apart from the training views' (options.seed).
_VAL_VIEW_SEED = 1000


def _val_views(
    classifier: Classifier,
    result: FitResult,
    val: list[Sample],
    options: TrainOptions,
    reporter: Reporter,
) -> list[np.ndarray]:
    """The trained model's pooled features of as many augmented views of each validation
    image as the cache makes of each training image (--views minus the image itself), for
    the out-of-distribution threshold only: never trained on, and not the calibration's."""
    from training.augment import AugmentConfig, build_augmenter

    if not options.augment:
        return []
    augment = build_augmenter(AugmentConfig(), options.seed + _VAL_VIEW_SEED)
    if augment is None:
        return []
    # One augmenter for every view: each pass draws new transforms.
    return [
        _embed(classifier, result, val, options, reporter, augment)[0]
        for _ in range(options.views - 1)
    ]


def _view_one(result: FitResult, n_train: int) -> np.ndarray | None:
    """The trained classifier's pooled features of the training images themselves (the
    cache's first view), or None without the feature cache."""
    return result.trained.train[:n_train] if result.trained is not None else None


def _test_metrics(probabilities: np.ndarray, parts: Split, classes: list[str]) -> dict:
    from training.evaluate import classification_metrics

    return classification_metrics([s.label for s in parts.test], probabilities, classes)


def _calibrate(
    classifier: Classifier,
    result: FitResult,
    parts: Split,
    test: np.ndarray,
    options: TrainOptions,
    reporter: Reporter,
) -> tuple[float | None, dict, dict | None]:
    """Temperature scaling fitted on the validation split, judged on the test split: the
    temperature (None: not calibrated), what metrics.json records, the reliability bins."""
    import numpy as np

    from training import calibration

    if not parts.val or not parts.test:
        return None, {"skipped": "the validation or test split is empty"}, None
    val = _predict(classifier, result, parts.val, options, reporter)
    temperature = calibration.fit_temperature(val, np.array([s.label for s in parts.val]))
    labels = np.array([s.label for s in parts.test])
    after = calibration.scale(test, temperature)
    record = {
        "temperature": round(temperature, 4),
        "ece_before": round(calibration.expected_calibration_error(test, labels), 5),
        "ece_after": round(calibration.expected_calibration_error(after, labels), 5),
        "bins": calibration.ECE_BINS,
        "fitted_on": "validation split",
        "measured_on": "test split",
    }
    bins = {
        "before": calibration.reliability(test, labels),
        f"after (T = {temperature:.2f})": calibration.reliability(after, labels),
    }
    return temperature, record, bins


def _calibrated_model(classifier: Classifier, temperature: float | None) -> keras.Model:
    """What is exported: the trained model in float32 (after mixed precision too), with the
    fitted temperature."""
    from training.calibration import calibrated
    from training.precision import float32_copy

    model = float32_copy(classifier.model)
    return model if temperature is None else calibrated(model, temperature)


def _summary(options: TrainOptions, metrics: dict, train_images: int, training: dict) -> dict:
    """The metrics the export's manifest carries (and the command prints); `training` says
    how the run trained (what ran the feature cache)."""
    return {
        "accuracy": metrics["accuracy"],
        "macro_f1": metrics["macro_f1"],
        "top_k_accuracy": metrics["top_k_accuracy"],
        "calibration": metrics["calibration"],
        "ood": {k: v for k, v in metrics["ood"].items() if not k.endswith("_scores")},
        "test_images": metrics["count"],
        "train_images": train_images,
        "split_seed": options.seed,
        "max_per_class": options.max_per_class,
        "training": training,
    }


def _publish(
    options: TrainOptions,
    classifier: Classifier,
    model: keras.Model,
    dataset: Dataset,
    summary: dict,
    tmp: Path,
    ood: OodDetector | None = None,
    gate_set: GateSet | None = None,
    reporter: Reporter | None = None,
    predict: Callable[[list[Sample]], np.ndarray] | None = None,
) -> tuple[int, Path, dict]:
    """Export `model` (the classifier's, calibrated, with the `ood` detector's outputs) into
    `tmp` and publish it as the next version of the name, through the promotion gate (the
    version, its folder, its promotion record as the JSON line prints it)."""
    from service.store.repository import ModelRepository
    from training.export import export_model
    from training.gate import publish_gated
    from training.gate import summary as summary_of
    from training.gate_options import PromoteMode
    from training.progress import Reporter

    export_dir = export_model(
        model,
        tmp / "export",
        labels=dataset.classes,
        image_size=classifier.image_size,
        backbone=classifier.backbone,
        metrics=summary,
        dataset_fingerprint=dataset.fingerprint,
        ood=ood,
    )
    repository = ModelRepository(options.model_root)
    version, promotion = publish_gated(
        repository, export_dir, options.name, mode=PromoteMode(options.promote), gate=gate_set,
        max_regression=options.max_regression, batch_size=options.batch_size,
        reporter=reporter or Reporter(True), predict=predict,
    )  # fmt: skip
    return version, repository.version_dir(options.name, version), summary_of(promotion)


def _gate_set(
    options: TrainOptions, dataset: Dataset, parts: Split, work_dir: Path, reporter: Reporter
) -> GateSet | None:
    """The promotion gate's held-out images: --gate-data (scanned now, before training, so a
    bad folder fails at once), else the test split."""
    from training import gate
    from training.gate_options import PromoteMode

    if options.promote == PromoteMode.ALWAYS:
        return None
    if options.gate_data is not None:
        return gate.from_folder(options.gate_data, work_dir, reporter)
    return gate.from_split(parts.test, dataset.classes) if parts.test else None


def train(
    data_dir: Annotated[
        Path, typer.Argument(help="folder with one sub-folder of images per class")
    ],
    name: Annotated[str, typer.Option(help="model name in the repository")],
    model_root: Annotated[Path, typer.Option(help="model repository to publish into")],
    backbone: Annotated[str, typer.Option(help="pretrained backbone")] = DEFAULT_BACKBONE,
    image_size: Annotated[
        int | None, typer.Option(help=f"input side in pixels [default: {DEFAULT_IMAGE_SIZE}]")
    ] = None,
    epochs: Annotated[int, typer.Option(help="phase-1 (frozen backbone) epochs")] = DEFAULT_EPOCHS,
    fine_tune_epochs: Annotated[
        int, typer.Option(help="phase-2 (fine-tune) epochs; 0 skips phase 2")
    ] = DEFAULT_FINE_TUNE_EPOCHS,
    fine_tune_layers: Annotated[
        int | None, typer.Option(help="top backbone layers to unfreeze [default: per backbone]")
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(
            help=f"[default: {DEFAULT_BATCH_SIZE}, {GPU_BATCH_SIZE} where a GPU is visible]"
        ),
    ] = None,
    max_per_class: Annotated[
        int | None, typer.Option(help="cap training images per class (few-shot runs)")
    ] = None,
    seed: Annotated[int, typer.Option(help="seed for the split, shuffling and augmentation")] = 0,
    report_dir: Annotated[
        Path | None, typer.Option(help="report folder [default: reports/NAME-train-TIME]")
    ] = None,
    no_augment: Annotated[bool, typer.Option("--no-augment", help="no augmentation")] = False,
    no_cache: Annotated[
        bool, typer.Option("--no-cache", help="phase 1 on pixels, no feature cache")
    ] = False,
    views: Annotated[
        int, typer.Option(help="cached views per image: the image + (N-1) augmented ones")
    ] = 2,
    weights: Annotated[
        str, typer.Option(help="backbone weights: imagenet, a weights file, or none")
    ] = "imagenet",
    hidden_units: Annotated[
        int, typer.Option(help="units of the head's hidden Dense layer; 0 for none")
    ] = DEFAULT_HIDDEN_UNITS,
    runtime: Annotated[
        str,
        typer.Option(
            envvar="GRAFT_RUNTIME",
            help="what runs the frozen backbone for the feature cache: auto|onnxruntime|"
            "openvino|tensorflow; auto = ONNX Runtime when installed, else TensorFlow",
        ),
    ] = DEFAULT_RUNTIME,
    mixed_precision: Annotated[
        bool,
        typer.Option(
            "--mixed-precision",
            help="float16 compute while training (fast on a GPU, slow on a CPU); the export "
            "stays float32",
        ),
    ] = False,
    promote: Promote = PromoteMode.GATED,
    gate_data: GateData = None,
    max_regression: MaxRegression = DEFAULT_MAX_REGRESSION,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress or tables")] = False,
) -> None:
    """Train a classifier on DATA_DIR, evaluate it, publish it as a new version of NAME
    (served once the promotion gate finds it no worse than the active version)."""
    from service.runtime.networks import RuntimeUnavailable, resolve
    from service.store.manifest import MAX_IMAGE_SIZE

    batch_size = batch_size or default_batch_size()
    options = TrainOptions(
        data_dir, name, model_root, backbone, image_size, epochs, fine_tune_epochs,
        fine_tune_layers, batch_size, max_per_class, seed, report_dir, not no_augment,
        not no_cache, views, weights, quiet, hidden_units, runtime, mixed_precision,
        promote=promote.value, gate_data=gate_data, max_regression=max_regression,
    )  # fmt: skip
    # DataError is a ValueError; RuntimeUnavailable: a named runtime missing or failing (a
    # file it cannot run is a RejectedModel, a GraftError).
    with one_line_errors(FileNotFoundError, ValueError, RuntimeUnavailable):
        _check_positive(epochs=epochs, batch_size=batch_size, views=views)
        if hidden_units < 0:
            raise ValueError(f"--hidden-units must be 0 or more, got {hidden_units}")
        if image_size is not None and not 32 <= image_size <= MAX_IMAGE_SIZE:
            # graft.json bounds it (a version asking for more is refused at load): say so now,
            # not after an hour of training.
            raise ValueError(f"--image-size must be 32 to {MAX_IMAGE_SIZE}, got {image_size}")
        resolve(runtime, name="--runtime")  # before the scan: fails at once, naming the option
        _check_gate_options(options)
        result = run_train(options)
    typer.echo(json.dumps(result))


def _check_gate_options(options: TrainOptions) -> None:
    """Bad promotion-gate options fail before training: --max-regression out of [0, 1], a
    --gate-data folder that is missing, empty, or holds classes the training folder lacks."""
    from training import gate
    from training.scan import list_classes

    gate.check_max_regression(options.max_regression)
    if options.gate_data is not None:
        classes = gate.gate_classes(options.gate_data)
        gate.check_classes(classes, list_classes(options.data_dir), "the training folder")


def _check_positive(**values: int) -> None:
    for key, value in values.items():
        if value < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be at least 1, got {value}")


def run_evaluate(
    data_dir: Path,
    name: str,
    model_root: Path,
    version: int | None,
    report_dir: Path | None,
    batch_size: int,
    quiet: bool,
) -> dict:
    """Evaluate a published version on every readable image of a class-folder tree."""
    import numpy as np

    from service.store.layout import LABELS_FILE, MANIFEST_FILE
    from service.store.promotion import resolve_served
    from service.store.repository import ModelRepository
    from training.error_report import write_evaluation_report
    from training.evaluate import classification_metrics, predict_saved_model
    from training.progress import Reporter
    from training.report import print_summary, write_report
    from training.scan import DataError

    reporter = Reporter(quiet)
    repository = ModelRepository(model_root)
    resolved = resolve_served(repository, name, version)  # what requests naming none get
    labels = repository.verify(name, resolved).labels
    with tempfile.TemporaryDirectory(prefix="graft-evaluate-") as tmp:
        dataset = _scan(data_dir, Path(tmp), reporter, for_training=False)
        unknown = sorted(set(dataset.classes) - set(labels))
        if unknown:
            raise DataError(
                f"class folder(s) {', '.join(unknown)} are not labels of {name} v{resolved} "
                f"(its labels: {', '.join(labels)})"
            )
        version_dir = repository.version_dir(name, resolved)
        probabilities, model_labels = predict_saved_model(
            version_dir, dataset.samples, batch_size, reporter
        )
        if model_labels != labels:
            raise DataError(f"{version_dir}: {LABELS_FILE} disagrees with {MANIFEST_FILE}'s labels")
        y_true = np.array([labels.index(dataset.classes[s.label]) for s in dataset.samples])
        metrics = classification_metrics(y_true, probabilities, labels)
        report_dir = report_dir or _default_report_dir(name, f"v{resolved}-evaluate")
        files = write_report(report_dir, metrics)
        # Inside `tmp`: the report's images are the scan's re-encodes where there are some.
        write_evaluation_report(
            report_dir, f"{name} v{resolved}", metrics, files, dataset, y_true, probabilities,
            version_dir, reporter,
        )  # fmt: skip
    print_summary(reporter.console, metrics, f"{name} v{resolved} on {data_dir}")
    return {"name": name, "version": resolved, **metrics, "report": files}


def evaluate(
    data_dir: Annotated[
        Path, typer.Argument(help="folder with one sub-folder of images per class")
    ],
    name: Annotated[str, typer.Option(help="model name in the repository")],
    model_root: Annotated[Path, typer.Option(help="model repository")],
    version: Annotated[
        int | None,
        typer.Option(
            help="version to evaluate (default: the served one: pinned, else newest promoted)"
        ),
    ] = None,
    report_dir: Annotated[Path | None, typer.Option(help="report folder")] = None,
    batch_size: Annotated[int, typer.Option()] = DEFAULT_BATCH_SIZE,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress or tables")] = False,
) -> None:
    """Evaluate a published model version on every image of DATA_DIR's class folders."""
    with one_line_errors(FileNotFoundError, ValueError):  # DataError is a ValueError
        _check_positive(batch_size=batch_size)
        result = run_evaluate(data_dir, name, model_root, version, report_dir, batch_size, quiet)
    typer.echo(json.dumps(result))


def register(app: typer.Typer) -> None:
    commands: list[Callable[..., None]] = [train, evaluate]
    for command in commands:
        app.command()(command)

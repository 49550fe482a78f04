"""The error-analysis report: `report.html` beside metrics.json, written by `graft train` (about
the test split) and `graft evaluate` (about the folder it scored).

One self-contained page (training/report_html.py renders it): headline metrics, the per-class
table, the confusion matrix, the most confused pairs with example images, the highest-loss
images with their Grad-CAM, calibration, the out-of-distribution threshold and scores, the
training curves and the dataset checks (skipped files, class balance, near-duplicates across
train and test). A section whose data does not exist (a model without OOD scores or without
the `explain` signature, an evaluation that trained nothing) says why it is absent.

Its images are what serving sees: each sample's `decode_path`, which the scan's work folder
may hold, so the report is written while that folder still exists.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from service.store.layout import SAVED_MODEL_FILE
from training.progress import Reporter
from training.report_html import Markup, Section, paragraph, render
from training.report_sections import Images, SectionInputs, build_sections
from training.scan import Dataset, Sample

if TYPE_CHECKING:
    from training.split import Split

REPORT_FILE = "report.html"


@dataclass
class ReportInputs:
    """What one report is about."""

    report_dir: Path
    title: str
    command: str  # "train" or "evaluate": says why some sections are absent
    metrics: dict  # classification_metrics(), with calibration / ood when the run made them
    files: dict[str, str]  # write_report()'s files; the report adds the figures it draws
    samples: Sequence[Sample]  # the scored images: the test split, or the evaluated folder
    y_true: np.ndarray  # their classes, as indices into metrics["labels"]
    probabilities: np.ndarray  # the published version's scores for them
    dataset: Dataset
    version_dir: Path
    split: Split | None = None  # training: class balance per split, near-duplicates
    # training with the feature cache: pooled features of split.train and split.test, in order
    train_features: np.ndarray | None = None
    test_features: np.ndarray | None = None


def write_html_report(inputs: ReportInputs, reporter: Reporter) -> Path:
    """Write REPORT_DIR/report.html and add it to `inputs.files` as "html"."""
    images = Images(inputs.dataset.root)
    losses = _losses(inputs.probabilities, inputs.y_true)
    worst = [int(i) for i in np.argsort(-losses, kind="stable")[: Images.HIGHEST_LOSS]]
    gradcam = gradcam_overlays(inputs.version_dir, [inputs.samples[i] for i in worst])
    if isinstance(gradcam, str) and gradcam.startswith("Grad-CAM failed"):
        reporter.info(f"warning: report.html: {gradcam}")
    sections: list[Section] = build_sections(
        SectionInputs(
            report_dir=inputs.report_dir,
            command=inputs.command,
            metrics=inputs.metrics,
            files=inputs.files,
            samples=inputs.samples,
            y_true=inputs.y_true,
            probabilities=inputs.probabilities,
            losses=losses,
            worst=worst,
            gradcam=gradcam,
            dataset=inputs.dataset,
            split=inputs.split,
            train_features=inputs.train_features,
            test_features=inputs.test_features,
        ),
        images,
    )
    path = inputs.report_dir / REPORT_FILE
    path.write_text(render(inputs.title, _subtitle(inputs), sections), "utf-8")
    inputs.files["html"] = str(path)
    return path


def _losses(probabilities: np.ndarray, y_true: np.ndarray) -> np.ndarray:
    """Cross-entropy of each image: -log p(true class)."""
    if len(y_true) == 0:
        return np.zeros(0)
    picked = probabilities[np.arange(len(y_true)), y_true].astype(np.float64)
    return -np.log(np.clip(picked, 1e-12, 1.0))  # a float32 sum can round p above 1


def _subtitle(inputs: ReportInputs) -> Markup:
    scope = (
        f"the test split ({len(inputs.samples)} images)"
        if inputs.command == "train"
        else f"every readable image of the folder ({len(inputs.samples)} images)"
    )
    return paragraph(
        f"graft {inputs.command}: {inputs.version_dir} on {scope} of {inputs.dataset.root}",
        "muted",
    )


def _signatures(version_dir: Path) -> set[str]:
    """The signature names of a SavedModel, read from saved_model.pb without loading it."""
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString((version_dir / SAVED_MODEL_FILE).read_bytes())
    return {name for graph in proto.meta_graphs for name in graph.signature_def}


def gradcam_overlays(version_dir: Path, samples: Sequence[Sample]) -> list[bytes] | str:
    """Grad-CAM overlays (PNG) of `samples` from the version's own `explain` signature, or
    the reason there are none."""
    if not samples:
        return "there are no images to explain"
    if importlib.util.find_spec("training.explain") is None:
        return "this graft has no Grad-CAM (training/explain.py is missing)"
    from service.store.layout import EXPLAIN_SIGNATURE
    from training.explain import explain_images

    if EXPLAIN_SIGNATURE not in _signatures(version_dir):
        return (
            f"the version at {version_dir} has no `{EXPLAIN_SIGNATURE}` signature (it was "
            "exported before explanations existed): train it again to get Grad-CAM"
        )

    try:
        explanations = explain_images(version_dir, [s.decode_path.read_bytes() for s in samples])
    except Exception as exc:  # a finished training run is not failed by its report's figure
        return f"Grad-CAM failed ({type(exc).__name__}: {exc})"
    return [explanation.overlay_png for explanation in explanations]


def write_training_report(
    report_dir: Path,
    title: str,
    metrics: dict,
    files: dict[str, str],
    dataset: Dataset,
    split: Split,
    test_probabilities: np.ndarray,
    temperature: float | None,
    version_dir: Path,
    train_features: np.ndarray | None,
    test_features: np.ndarray | None,
    reporter: Reporter,
) -> Path:
    """`graft train`'s report.html: about the test split, with the published (calibrated)
    scores; `test_probabilities` are the trained model's before the temperature. The
    features (pooled, of split.train and split.test) feed the near-duplicate check."""
    from training.calibration import scale

    scores = test_probabilities if temperature is None else scale(test_probabilities, temperature)
    inputs = ReportInputs(
        report_dir, f"{title}: training report", "train", metrics, files, split.test,
        np.array([s.label for s in split.test], np.int64), scores, dataset, version_dir,
        split, train_features, test_features,
    )  # fmt: skip
    return write_html_report(inputs, reporter)


def write_evaluation_report(
    report_dir: Path,
    title: str,
    metrics: dict,
    files: dict[str, str],
    dataset: Dataset,
    y_true: np.ndarray,
    probabilities: np.ndarray,
    version_dir: Path,
    reporter: Reporter,
) -> Path:
    """`graft evaluate`'s report.html: about every image it scored."""
    inputs = ReportInputs(
        report_dir, f"{title}: evaluation report", "evaluate", metrics, files,
        dataset.samples, y_true, probabilities, dataset, version_dir,
    )  # fmt: skip
    return write_html_report(inputs, reporter)

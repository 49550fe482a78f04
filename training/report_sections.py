"""The sections of report.html, each from the data it shows, or the reason it is absent.

Every value from the data goes into the page through training/report_html.py's functions,
which escape it. Work is bounded: at most a few dozen thumbnails, a table of at most
MAX_ROWS rows, one Grad-CAM call on the highest-loss images.
"""

from __future__ import annotations

import io
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from training.duplicates import NEAR_DUPLICATE_SIMILARITY, NearDuplicate, nearest
from training.report_html import (
    Markup,
    Section,
    bar,
    code,
    details,
    figure,
    gallery,
    image,
    join,
    paragraph,
    table,
)
from training.scan import Dataset, Sample

if TYPE_CHECKING:
    from training.split import Split

MAX_ROWS = 100  # rows of a long table (skipped files, near-duplicates)

# (anchor, heading, level): the page's sections, in order.
SECTIONS = (
    ("headline", "Headline metrics", 2),
    ("per-class", "Per-class metrics", 2),
    ("confusion", "Confusion matrix", 2),
    ("confused-pairs", "Most confused pairs", 2),
    ("highest-loss", "Highest-loss images", 2),
    ("calibration", "Calibration", 2),
    ("ood", "Out-of-distribution scores", 2),
    ("curves", "Training curves", 2),
    ("dataset", "Dataset checks", 2),
    ("skipped", "Skipped files", 3),
    ("balance", "Class balance", 3),
    ("duplicates", "Near-duplicates across train and test", 3),
)
HEADINGS = {anchor: heading for anchor, heading, _ in SECTIONS}


class Images:
    """Thumbnails of the report's images (JPEG, made once each) and their names."""

    THUMBNAIL_PX = 128
    EXAMPLES_PER_PAIR = 4
    HIGHEST_LOSS = 8
    DUPLICATE_PAIRS = 12
    NEAR_MISSES = 5

    def __init__(self, root: Path) -> None:
        self._root = root
        self._thumbnails: dict[Path, bytes | None] = {}

    def name(self, sample: Sample) -> str:
        try:
            return sample.path.relative_to(self._root).as_posix()
        except ValueError:
            return sample.path.name

    def thumbnail(self, sample: Sample, caption: object) -> Markup:
        path = sample.decode_path
        if path not in self._thumbnails:
            self._thumbnails[path] = _thumbnail(path, self.THUMBNAIL_PX)
        content = self._thumbnails[path]
        if content is None:
            return figure(paragraph("(unreadable)", "muted"), caption)
        return figure(image(content, "image/jpeg", self.name(sample), "thumb"), caption)


def _thumbnail(path: Path, side: int) -> bytes | None:
    """The image at most `side` pixels wide and high, as JPEG; None if it no longer reads."""
    from PIL import Image

    try:
        with Image.open(path) as opened:
            opened.draft(opened.mode, (2 * side, 2 * side))  # JPEG: decode at a reduced size
            rgb = opened.convert("RGB")  # GIF: the first frame, as the decoder reads it
    except (OSError, ValueError):
        return None
    rgb.thumbnail((side, side))
    buffer = io.BytesIO()
    rgb.save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


@dataclass
class SectionInputs:
    report_dir: Path
    command: str  # "train" or "evaluate"
    metrics: dict
    files: dict[str, str]
    samples: Sequence[Sample]
    y_true: np.ndarray
    probabilities: np.ndarray
    losses: np.ndarray
    worst: list[int]  # indices of the highest-loss samples, highest first
    gradcam: list[bytes] | str  # overlays of `worst`, or why there are none
    dataset: Dataset
    split: Split | None
    train_features: np.ndarray | None  # pooled, of split.train and split.test, in order
    test_features: np.ndarray | None

    @property
    def labels(self) -> list[str]:
        return list(self.metrics["labels"])

    @property
    def predicted(self) -> np.ndarray:
        return np.argmax(self.probabilities, axis=1)


def _section(anchor: str, body: Markup | None, absent: str | None = None) -> Section:
    level = next(level for a, _, level in SECTIONS if a == anchor)
    return Section(anchor, HEADINGS[anchor], body, absent, level)


def _png(path: str | None, alt: str) -> Markup | None:
    if not path or not Path(path).is_file():
        return None
    return image(Path(path).read_bytes(), "image/png", alt, "plot")


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f} %"


def _figure(value: object) -> object:
    """A float as 4 significant digits; anything else as it is."""
    return f"{value:.4g}" if isinstance(value, float) else value


def headline(data: SectionInputs, images: Images) -> Section:
    m = data.metrics
    rows: list[tuple[str, object]] = [
        ("accuracy", f"{m['accuracy']:.4f}"),
        ("macro-F1", f"{m['macro_f1']:.4f}"),
    ]
    rows += [(f"top-{k} accuracy", f"{v:.4f}") for k, v in m["top_k_accuracy"].items() if k != "1"]
    rows.append(("images scored", m["count"]))
    calibration = m.get("calibration") or {}
    if "ece_after" in calibration:
        ece = _figure(calibration["ece_after"])
        rows.append(("expected calibration error (after calibration)", ece))
    ood = m.get("ood") or {}
    if "test_flagged_rate" in ood:
        rows.append(("test images flagged out-of-distribution", _pct(ood["test_flagged_rate"])))
    rows += [
        ("files skipped", len(data.dataset.rejected)),
        ("dataset fingerprint", code(data.dataset.fingerprint)),
    ]
    return _section("headline", table(["figure", "value"], rows))


def per_class(data: SectionInputs, images: Images) -> Section:
    rows = [
        (label, f"{s['precision']:.3f}", f"{s['recall']:.3f}", f"{s['f1']:.3f}", s["support"])
        for label, s in data.metrics["per_class"].items()
    ]
    return _section("per-class", table(["class", "precision", "recall", "F1", "support"], rows))


def confusion(data: SectionInputs, images: Images) -> Section:
    labels, matrix = data.labels, data.metrics["confusion_matrix"]
    cells = table(
        ["true \\ predicted", *labels],
        [[label, *row] for label, row in zip(labels, matrix, strict=True)],
    )
    plot = _png(data.files.get("confusion_matrix_png"), "confusion matrix")
    body = join([plot or "", details("the matrix as a table (rows: true class)", cells)])
    return _section("confusion", body)


def confused_pairs(data: SectionInputs, images: Images) -> Section:
    pairs = data.metrics["most_confused"]
    if not pairs:
        return _section("confused-pairs", None, "no image was misclassified")
    labels, predicted = data.labels, data.predicted
    parts: list[Markup] = []
    for pair in pairs:
        t, p = labels.index(pair["true"]), labels.index(pair["predicted"])
        which = np.flatnonzero((data.y_true == t) & (predicted == p))
        which = which[np.argsort(-data.probabilities[which, p], kind="stable")]
        shown = [
            images.thumbnail(
                data.samples[i],
                join([images.name(data.samples[i]), f" p={data.probabilities[i, p]:.3f}"]),
            )
            for i in which[: Images.EXAMPLES_PER_PAIR]
        ]
        head = f"{pair['true']} predicted as {pair['predicted']}: {pair['count']} image(s)"
        parts += [paragraph(head), gallery(shown)]
    return _section("confused-pairs", join(parts))


def highest_loss(data: SectionInputs, images: Images) -> Section:
    if not data.worst:
        return _section("highest-loss", None, "there are no scored images")
    labels, predicted = data.labels, data.predicted
    overlays = data.gradcam if isinstance(data.gradcam, list) else []
    shown = []
    for rank, i in enumerate(data.worst):
        sample = data.samples[i]
        caption = join(
            [
                images.name(sample),
                f": true {labels[data.y_true[i]]}",
                f" (p={data.probabilities[i, data.y_true[i]]:.3f}),",
                f" predicted {labels[predicted[i]]} (p={data.probabilities[i, predicted[i]]:.3f}),",
                f" loss {data.losses[i]:.3f}",
            ]
        )
        shown.append(images.thumbnail(sample, caption))
        if rank < len(overlays):
            overlay = image(
                overlays[rank], "image/png", f"Grad-CAM of {images.name(sample)}", "thumb"
            )
            shown.append(figure(overlay, join(["Grad-CAM: ", images.name(sample)])))
    note = (
        paragraph("Beside each image: its Grad-CAM (the published version's explain signature).")
        if overlays
        else paragraph(f"Grad-CAM not shown: {data.gradcam}", "absent")
    )
    intro = paragraph("Loss = -log p(true class), under the published version's scores.")
    return _section("highest-loss", join([intro, note, gallery(shown)]))


def calibration(data: SectionInputs, images: Images) -> Section:
    from training import calibration as cal
    from training.report import plot_reliability

    if not data.samples:
        return _section("calibration", None, "there are no scored images")
    recorded = data.metrics.get("calibration") or {}
    rows: list[tuple[str, object]] = []
    if "skipped" in recorded:
        rows.append(("temperature scaling", f"skipped: {recorded['skipped']}"))
    for key in ("temperature", "ece_before", "ece_after", "fitted_on", "measured_on"):
        if key in recorded:
            rows.append((key.replace("_", " "), _figure(recorded[key])))
    ece = cal.expected_calibration_error(data.probabilities, data.y_true)
    rows.append(
        (f"ECE of the published scores on these images ({cal.ECE_BINS} bins)", f"{ece:.5f}")
    )
    if not data.files.get("reliability_png"):
        bins = {"published scores": cal.reliability(data.probabilities, data.y_true)}
        path = data.report_dir / "reliability.png"
        data.files["reliability_png"] = str(
            plot_reliability(bins, path, "reliability of the published scores")
        )
    plot = _png(data.files.get("reliability_png"), "reliability diagram")
    return _section("calibration", join([table(["figure", "value"], rows), plot or ""]))


def ood(data: SectionInputs, images: Images) -> Section:
    from training.report import plot_ood_scores

    record = data.metrics.get("ood")
    if not record or "threshold" not in record:
        if record and "skipped" in record:
            return _section("ood", None, f"the run skipped it: {record['skipped']}")
        why = (
            "graft evaluate computes no out-of-distribution scores: the training run's report "
            "has the threshold and the score histogram"
            if data.command == "evaluate"
            else "this training run recorded no out-of-distribution scores (metrics.json has "
            "no `ood`)"
        )
        return _section("ood", None, why)
    rows: list[tuple[str, object]] = [
        (key.replace("_", " "), _figure(record[key]))
        for key in ("method", "threshold", "percentile")
        if key in record
    ]
    for key in ("validation_flagged_rate", "test_flagged_rate"):
        if key in record:
            rows.append((key.replace("_", " "), _pct(record[key])))
    scores = {
        name: [float(v) for v in record.get(f"{name}_scores") or []]
        for name in ("validation", "test")
    }
    scores = {name: values for name, values in scores.items() if values}
    plot = None
    if scores:
        path = data.report_dir / "ood_scores.png"
        method = str(record.get("method", ""))
        plot_ood_scores(scores, float(record["threshold"]), path, method)
        data.files["ood_png"] = str(path)
        plot = _png(str(path), "histogram of the out-of-distribution scores")
    note = paragraph(
        "An image scoring above the threshold is flagged as not like the training data. The "
        "threshold is the conformal 99th percentile of the validation images' scores: a new "
        "image like them is flagged with probability at most 1 %."
    )
    return _section("ood", join([note, table(["figure", "value"], rows), plot or ""]))


def curves(data: SectionInputs, images: Images) -> Section:
    plot = _png(data.files.get("curves_png"), "training curves")
    if plot is None:
        why = (
            "graft evaluate trains nothing: the training run's report has its curves"
            if data.command == "evaluate"
            else "the run recorded no training history"
        )
        return _section("curves", None, why)
    return _section("curves", plot)


def dataset_intro(data: SectionInputs, images: Images) -> Section:
    dataset = data.dataset
    text = join(
        [
            f"{len(dataset.samples)} readable images in {len(dataset.classes)} class folders of ",
            code(dataset.root),
            ".",
        ]
    )
    return _section("dataset", paragraph(text))


def skipped(data: SectionInputs, images: Images) -> Section:
    rejected = data.dataset.rejected
    if not rejected:
        return _section("skipped", paragraph("None: every file passed the checks."))
    rows = []
    for item in rejected[:MAX_ROWS]:
        try:
            name = item.path.relative_to(data.dataset.root).as_posix()
        except ValueError:
            name = item.path.name
        rows.append((name, item.reason))
    more = len(rejected) - len(rows)
    intro = paragraph(
        f"{len(rejected)} file(s) left out: serving would refuse them, or the model's decoder "
        f"cannot read them.{f' The first {len(rows)}:' if more else ''}"
    )
    return _section("skipped", join([intro, table(["file", "reason"], rows, numeric_from=2)]))


def balance(data: SectionInputs, images: Images) -> Section:
    classes = data.dataset.classes
    columns: dict[str, list[int]] = {}
    if data.split is not None:
        for name in ("train", "val", "test"):
            counts = [0] * len(classes)
            for sample in getattr(data.split, name):
                counts[sample.label] += 1
            columns[name] = counts
    columns["readable images"] = data.dataset.counts()
    totals = columns["readable images"]
    peak = max(totals) or 1
    rows = [
        [label, *(column[c] for column in columns.values()), bar(totals[c] / peak)]
        for c, label in enumerate(classes)
    ]
    smallest = min(totals)
    ratio = f"{peak / smallest:.1f}" if smallest else "inf"
    intro = paragraph(
        f"Largest class / smallest class: {ratio}. Training weighs classes by the inverse of "
        "their size; a class far smaller than the others still has few examples to learn from."
    )
    header = ["class", *columns, ""]
    body = table(header, rows)
    return _section("balance", join([intro, body]))


def duplicates(data: SectionInputs, images: Images) -> Section:
    if data.split is None:
        return _section(
            "duplicates",
            None,
            "graft evaluate scores one folder, with no training split to compare it with: "
            "the training run's report has this check",
        )
    features = (data.train_features, data.test_features)
    if features[0] is None or features[1] is None:
        return _section(
            "duplicates",
            None,
            "the run has no cached pooled features of its training images, which this check "
            "compares (it trained with --no-cache, or phase 2 trained on pixels)",
        )
    train, test = data.split.train, data.split.test
    if (len(features[0]), len(features[1])) != (len(train), len(test)):
        return _section(
            "duplicates",
            None,
            f"the cached features cover {len(features[0])} training and {len(features[1])} "
            f"test images, not the split's {len(train)} and {len(test)}",
        )
    started = time.perf_counter()
    found = nearest(*features)
    pairs = found.duplicates(NEAR_DUPLICATE_SIMILARITY)
    seconds = time.perf_counter() - started
    largest = float(found.similarity.max()) if len(found.similarity) else float("nan")
    intro = paragraph(
        f"Each test image against each training image ({len(test)} x {len(train)}, "
        f"{seconds:.2f} s): cosine similarity of the trained classifier's pooled features "
        f"(from the feature cache). A pair at {NEAR_DUPLICATE_SIMILARITY} or more is a "
        "near-duplicate: the test score then partly measures memory, not generalisation. "
        f"{len(pairs)} test image(s) found; the highest similarity is {largest:.4f}."
    )
    near = found.closest_below(NEAR_DUPLICATE_SIMILARITY, Images.NEAR_MISSES)
    closest = [
        paragraph(
            f"The {len(near)} most similar pairs under the threshold, to judge by eye (the same "
            "leaf photographed again can score just under it):"
        ),
        _pair_gallery(near, test, train, images),
    ]
    if not pairs:
        return _section("duplicates", join([intro, *(closest if near else [])]))
    classes = data.dataset.classes
    rows = []
    for pair in pairs[:MAX_ROWS]:
        a, b = test[pair.test], train[pair.train]
        note = "" if a.label == b.label else "different classes"
        rows.append(
            (images.name(a), classes[a.label], images.name(b), classes[b.label], note,
             f"{pair.similarity:.4f}")
        )  # fmt: skip
    header = ["test image", "class", "training image", "class", "", "similarity"]
    found_pairs = [table(header, rows, numeric_from=5), _pair_gallery(pairs, test, train, images)]
    return _section("duplicates", join([intro, *found_pairs, *(closest if near else [])]))


def _pair_gallery(
    pairs: Sequence[NearDuplicate], test: Sequence[Sample], train: Sequence[Sample], images: Images
) -> Markup:
    """Each pair's test image beside its training image, for the first DUPLICATE_PAIRS."""
    shown = []
    for pair in pairs[: Images.DUPLICATE_PAIRS]:
        a, b = test[pair.test], train[pair.train]
        shown += [
            images.thumbnail(a, join(["test: ", images.name(a)])),
            images.thumbnail(b, join(["train: ", images.name(b), f" ({pair.similarity:.4f})"])),
        ]
    return gallery(shown)


BUILDERS = (
    headline,
    per_class,
    confusion,
    confused_pairs,
    highest_loss,
    calibration,
    ood,
    curves,
    dataset_intro,
    skipped,
    balance,
    duplicates,
)


def build_sections(data: SectionInputs, images: Images) -> list[Section]:
    return [build(data, images) for build in BUILDERS]

"""The promotion gate: a new version serves only when it is no worse than the one serving now.

`graft train`, `graft publish` and `graft push` publish a version as a candidate, measure it
and the active (stable) version on the same held-out images, and record the decision
(service/store/promotion.py):

- promoted when its accuracy and macro-F1 are each no lower than the active version's minus
  `--max-regression` (and it passes the sanity checks below);
- rejected otherwise: kept on disk with the figures, never served unless an operator pins or
  promotes it, the active version serving on.

Sanity, for every candidate and the only check for a model's first version (nothing to
compare with): its probabilities are finite and its accuracy is above chance, the share of
the held-out set's largest class (what always answering that class scores). A shuffled
folder's model lands at chance.

The held-out images: the training split's test part (`graft train`), or `--gate-data DIR`,
laid out like a training folder, whose classes must be labels of the candidate. Both versions
are measured on top-1 labels, so a version with other labels is compared fairly: a class it
lacks counts as missed.

`--promote always` skips the measurement (promoted at once), `--promote never` measures but
keeps the candidate for an operator (`graft promote`).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from service.wire import GateFigures, GateResult, Promotion, PromotionState
from training.gate_options import PromoteMode

if TYPE_CHECKING:
    from service.store.repository import ModelRepository
    from training.progress import Reporter
    from training.scan import Sample

Predict = Callable[[list["Sample"]], np.ndarray]
_SERVED_BATCH = 16  # images per /classify request when the server measures the active version
_EPSILON = 1e-9  # equal figures are "no worse" despite float rounding


@dataclass(frozen=True)
class GateSet:
    """The held-out images and their true classes."""

    source: str
    samples: list[Sample]
    classes: list[str]  # what each sample's `label` indexes

    @property
    def truth(self) -> list[str]:
        return [self.classes[s.label] for s in self.samples]

    @property
    def chance(self) -> float:
        counts = Counter(s.label for s in self.samples)
        return max(counts.values()) / len(self.samples)


def check_max_regression(max_regression: float) -> None:
    if not 0 <= max_regression <= 1:
        raise ValueError(
            f"--max-regression must be 0 to 1 (a drop in accuracy and macro-F1), got "
            f"{max_regression}"
        )


def gate_classes(folder: Path) -> list[str]:
    """The class folders of `--gate-data` (cheap: before anything is trained or uploaded)."""
    from training.scan import DataError, list_classes

    try:
        return list_classes(folder, min_classes=1)
    except DataError as exc:
        raise DataError(f"--gate-data: {exc}") from None


def check_classes(classes: Sequence[str], labels: Sequence[str], what: str) -> None:
    """Every held-out class must be a label of the candidate (`what` names it)."""
    from training.scan import DataError

    unknown = sorted(set(classes) - set(labels))
    if unknown:
        raise DataError(
            f"--gate-data has class folder(s) {', '.join(unknown)} that {what} does not have "
            f"(its labels: {', '.join(labels)}); remove them or gate on another folder"
        )


def from_split(samples: list[Sample], classes: list[str]) -> GateSet:
    return GateSet("test split", samples, classes)


def from_folder(folder: Path, work_dir: Path, reporter: Reporter) -> GateSet:
    """Scan `--gate-data` as `graft evaluate` scans its folder (serving's upload check too)."""
    from training.scan import DataError, scan

    try:
        dataset = scan(folder, work_dir, for_training=False)
    except DataError as exc:
        raise DataError(f"--gate-data: {exc}") from None
    if dataset.rejected:
        reporter.info(f"warning: --gate-data: {dataset.rejected_summary()}")
    return GateSet(f"gate data {Path(folder).name}", dataset.samples, dataset.classes)


def measure_local(
    model_dir: Path, gate: GateSet, version: int | None, batch_size: int, reporter: Reporter
) -> tuple[GateFigures, bool]:
    """A SavedModel's figures on the gate set (its serving_default, as serving runs it), and
    whether every probability was finite."""
    from training.evaluate import predict_saved_model

    probabilities, labels = predict_saved_model(model_dir, gate.samples, batch_size, reporter)
    return _scored(probabilities, labels, gate, version)


def _scored(
    probabilities: np.ndarray, labels: list[str], gate: GateSet, version: int | None
) -> tuple[GateFigures, bool]:
    predicted = [labels[i] for i in np.argmax(probabilities, axis=1)]
    return figures(gate.truth, predicted, version), bool(np.isfinite(probabilities).all())


def measure_served(url: str, name: str, version: int, gate: GateSet) -> GateFigures:
    """The figures of the version a running server serves, through its own /classify."""
    from service.client.http import GraftClient

    predicted = []
    with GraftClient(url, timeout_s=120) as client:
        for start in range(0, len(gate.samples), _SERVED_BATCH):
            chunk = gate.samples[start : start + _SERVED_BATCH]
            batch = [s.decode_path.read_bytes() for s in chunk]
            answer = client.classify(batch, model=name, version=version, top_k=1)
            predicted += [r.top_k[0].label if r.top_k else r.label for r in answer.results]
    return figures(gate.truth, predicted, version)


def figures(truth: Sequence[str], predicted: Sequence[str], version: int | None) -> GateFigures:
    """Accuracy and macro-F1 of top-1 labels (over the classes true or predicted)."""
    from training.evaluate import classification_metrics

    labels = sorted(set(truth) | set(predicted))
    one_hot = np.eye(len(labels), dtype=np.float32)[[labels.index(p) for p in predicted]]
    metrics = classification_metrics(
        np.array([labels.index(t) for t in truth]), one_hot, labels, top_k=1
    )
    return GateFigures(
        version=version,
        accuracy=round(metrics["accuracy"], 6),
        macro_f1=round(metrics["macro_f1"], 6),
    )


def decide(
    gate: GateSet,
    candidate: GateFigures,
    active: GateFigures | None,
    *,
    finite: bool,
    max_regression: float,
    mode: PromoteMode,
    active_measured_by: str = "local",
) -> Promotion:
    """The gate's decision for `candidate` (under `--promote never`: what it would have been,
    the version staying a candidate)."""
    result = GateResult(
        source=gate.source,
        images=len(gate.samples),
        chance=round(gate.chance, 6),
        max_regression=max_regression,
        candidate=candidate,
        active=active,
        active_measured_by=active_measured_by if active is not None else None,
    )
    passed, why = _verdict(result, finite)
    if not passed and active is not None:
        why += f"; version {active.version} serves on"
    if mode == PromoteMode.NEVER:
        would = "promote" if passed else "reject"
        return Promotion(
            state=PromotionState.CANDIDATE,
            decided_by="never",
            reason=f"kept as a candidate (--promote never); the gate would {would} it: {why}",
            gate=result,
        )
    state = PromotionState.PROMOTED if passed else PromotionState.REJECTED
    return Promotion(state=state, decided_by="gate", reason=why, gate=result)


def _verdict(result: GateResult, finite: bool) -> tuple[bool, str]:
    candidate, active, n = result.candidate, result.active, result.images
    if not finite:
        return False, "the candidate's probabilities are not all finite on the held-out images"
    if candidate.accuracy <= result.chance + _EPSILON:
        return False, (
            f"accuracy {candidate.accuracy:.3f} on {n} held-out images ({result.source}) is no "
            f"better than chance ({result.chance:.3f}, always answering the largest class)"
        )
    if active is None:
        return True, (
            f"first version: accuracy {candidate.accuracy:.3f} on {n} held-out images "
            f"({result.source}) is above chance ({result.chance:.3f})"
        )
    floor = result.max_regression + _EPSILON
    worse = [
        f"{what} {mine:.3f} vs {theirs:.3f}"
        for what, mine, theirs in (
            ("accuracy", candidate.accuracy, active.accuracy),
            ("macro-F1", candidate.macro_f1, active.macro_f1),
        )
        if mine < theirs - floor
    ]
    if worse:
        return False, (
            f"worse than the active version {active.version} on {n} held-out images "
            f"({result.source}): {', '.join(worse)}, more than --max-regression "
            f"{result.max_regression:g} below"
        )
    return True, (
        f"no worse than the active version {active.version} on {n} held-out images "
        f"({result.source}): accuracy {candidate.accuracy:.3f} vs {active.accuracy:.3f}, "
        f"macro-F1 {candidate.macro_f1:.3f} vs {active.macro_f1:.3f} (--max-regression "
        f"{result.max_regression:g})"
    )


def first_version_without_gate_set(mode: PromoteMode) -> Promotion:
    """A model's first version published with no held-out images: nothing to compare with,
    and its manifest has been verified; serving still loads and warms it up before it serves."""
    if mode == PromoteMode.NEVER:
        return Promotion(
            state=PromotionState.CANDIDATE,
            decided_by="never",
            reason="kept as a candidate (--promote never); no held-out images were given",
        )
    return Promotion(
        state=PromotionState.PROMOTED,
        decided_by="gate",
        reason="first version of the model and no --gate-data: nothing to compare with, "
        "promoted on its verified manifest",
    )


def always() -> Promotion:
    return Promotion(
        state=PromotionState.PROMOTED,
        decided_by="always",
        reason="--promote always: promoted without the gate",
    )


def summary(promotion: Promotion) -> dict:
    """The record as the commands print it in their JSON line."""
    return json.loads(promotion.model_dump_json())


def require_gate_set(mode: PromoteMode, has_gate_set: bool, active: int | None, name: str) -> None:
    """Refuse, before anything is published, a gated publish that would have nothing to
    measure the candidate against the active version on."""
    if mode == PromoteMode.GATED and not has_gate_set and active is not None:
        raise ValueError(
            f"model {name!r} serves version {active}: the promotion gate compares the new "
            "version with it on held-out images, so pass --gate-data DIR (a folder of class "
            "folders), or --promote never (publish a candidate for `graft promote`), or "
            "--promote always"
        )


def publish_gated(
    repository: ModelRepository,
    export_dir: Path,
    name: str,
    *,
    mode: PromoteMode,
    gate: GateSet | None,
    max_regression: float,
    batch_size: int,
    reporter: Reporter,
    predict: Predict | None = None,
) -> tuple[int, Promotion]:
    """Publish `export_dir` as the next version of `name` through the gate; returns the
    version and its recorded promotion. `predict(samples)`, when given, is the candidate's
    probabilities over the export's labels (`graft train` has the model in memory: no load)."""
    from service.store.promotion import publish_candidate, record_promotion, stable_version

    if mode == PromoteMode.ALWAYS:
        version = publish_candidate(repository, export_dir, name, always())
        return version, _recorded(repository, name, version)
    active = stable_version(repository, name)  # before publishing: the candidate is not it
    require_gate_set(mode, gate is not None, active, name)
    version = publish_candidate(repository, export_dir, name)
    if gate is None:
        decision = first_version_without_gate_set(mode) if active is None else _unmeasured()
    else:
        decision = _measured(repository, name, version, active, gate, mode, max_regression,
                             batch_size, reporter, predict)  # fmt: skip
    return version, record_promotion(repository, name, version, decision)


def _measured(
    repository: ModelRepository,
    name: str,
    version: int,
    active: int | None,
    gate: GateSet,
    mode: PromoteMode,
    max_regression: float,
    batch_size: int,
    reporter: Reporter,
    predict: Predict | None,
) -> Promotion:
    try:
        if predict is not None:
            labels = repository.verify(name, version).labels
            candidate, finite = _scored(predict(gate.samples), labels, gate, version)
        else:
            version_dir = repository.version_dir(name, version)
            candidate, finite = measure_local(version_dir, gate, version, batch_size, reporter)
    except Exception as exc:  # a candidate the gate cannot even run is not promoted
        return Promotion(
            state=PromotionState.REJECTED,
            decided_by="gate",
            reason=f"the gate could not run the candidate: {type(exc).__name__}: {exc}"[:2000],
        )
    theirs = None
    if active is not None:
        try:
            theirs = measure_local(
                repository.version_dir(name, active), gate, active, batch_size, reporter
            )[0]
        except Exception as exc:  # nothing to compare with: an operator decides
            return Promotion(
                state=PromotionState.CANDIDATE,
                decided_by="gate",
                reason=f"the gate could not run the active version {active} "
                f"({type(exc).__name__}: {exc}"[:1800]
                + "); promote this one by hand",
            )
    return decide(gate, candidate, theirs, finite=finite, max_regression=max_regression, mode=mode)


def _unmeasured() -> Promotion:
    return Promotion(
        state=PromotionState.CANDIDATE,
        decided_by="never",
        reason="kept as a candidate (--promote never); no held-out images were given, so it "
        "was not measured",
    )


def _recorded(repository: ModelRepository, name: str, version: int) -> Promotion:
    from service.store.promotion import promotion_of, read_promotions

    return promotion_of(read_promotions(repository, name), version)

"""Split a scanned `Dataset` into train / validation / test: stratified, seeded, optionally
capped per class for few-shot runs, and written to a manifest that names every file."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from training.scan import DataError, Dataset, Sample

SPLIT_MANIFEST_VERSION = 1


@dataclass
class Split:
    train: list[Sample]
    val: list[Sample]
    test: list[Sample]
    seed: int
    fractions: tuple[float, float, float]
    max_per_class: int | None = None

    def to_manifest(self, dataset: Dataset) -> dict:
        def rows(samples: list[Sample]) -> list[dict]:
            return [
                {"path": s.path.relative_to(dataset.root).as_posix(), "label": s.label}
                for s in samples
            ]

        return {
            "version": SPLIT_MANIFEST_VERSION,
            "root": str(dataset.root),
            "classes": dataset.classes,
            "fingerprint": dataset.fingerprint,
            "seed": self.seed,
            "fractions": list(self.fractions),
            "max_per_class": self.max_per_class,
            "train": rows(self.train),
            "val": rows(self.val),
            "test": rows(self.test),
        }

    def write(self, dataset: Dataset, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_manifest(dataset), indent=1))
        return path


def _split_sizes(n: int, val: float, test: float) -> tuple[int, int]:
    n_val, n_test = round(n * val), round(n * test)
    if n >= 3:  # each class appears in every split when it can
        n_val, n_test = max(n_val, 1 if val > 0 else 0), max(n_test, 1 if test > 0 else 0)
    elif n == 2:
        n_val, n_test = 0, 1 if test > 0 else 0
    while n - n_val - n_test < 1:  # never leave a class without a training image
        if n_val >= n_test and n_val > 0:
            n_val -= 1
        else:
            n_test -= 1
    return n_val, n_test


def split(
    dataset: Dataset,
    *,
    seed: int = 0,
    val: float = 0.1,
    test: float = 0.1,
    max_per_class: int | None = None,
) -> Split:
    """Stratified, seeded train/val/test split: each class is shuffled with its own
    `numpy.random.default_rng((seed, label))` and cut by the fractions.

    `max_per_class` caps the TRAIN images per class (and validation in proportion) after the
    split, so the test set is the same with and without the cap and few-shot results stay
    comparable with full runs.
    """
    import numpy as np

    if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
        raise DataError(f"split fractions val={val}, test={test} must be >= 0 and sum to < 1")
    if max_per_class is not None and max_per_class < 1:
        raise DataError(f"--max-per-class must be at least 1, got {max_per_class}")
    by_class: list[list[Sample]] = [[] for _ in dataset.classes]
    for sample in dataset.samples:
        by_class[sample.label].append(sample)
    train, valid, tests = [], [], []
    val_cap = None
    if max_per_class is not None:
        val_cap = max(1, math.ceil(max_per_class * val / (1 - val - test)))
    for label, members in enumerate(by_class):
        order = np.random.default_rng((seed, label)).permutation(len(members))
        shuffled = [members[i] for i in order]
        n_val, n_test = _split_sizes(len(shuffled), val, test)
        tests += shuffled[:n_test]
        valid += shuffled[n_test : n_test + n_val][:val_cap]
        train += shuffled[n_test + n_val :][:max_per_class]
    return Split(train, valid, tests, seed, (1 - val - test, val, test), max_per_class)

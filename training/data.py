"""Training data: scan a folder of class sub-folders, validate every image up front, split it
(stratified, seeded, written to a manifest) and feed it to Keras through tf.data.

Pixels come from `training.preprocess.decode_and_resize`, the same function the exported
serving signature uses, so a model is trained on exactly the pixels it will see in production.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from service.errors import GraftError
from service.image_check import check_image

if TYPE_CHECKING:
    import tensorflow as tf

SPLIT_MANIFEST_VERSION = 1
# Decoded float pixels are cached in memory only below this size; above it the encoded bytes
# are cached and decoding (parallel) happens every epoch.
PIXEL_CACHE_BYTES = 768 * 1024**2


class DataError(ValueError):
    """The data folder cannot be trained on; the message says what to fix."""


@dataclass(frozen=True)
class Sample:
    path: Path  # the file in the data folder
    label: int
    # What the decoder reads: `path` itself, or serving's lossless re-encode of it (an EXIF-
    # rotated JPEG, a BMP TensorFlow misreads) written to the scan's work folder.
    source: Path | None = None

    @property
    def decode_path(self) -> Path:
        return self.source or self.path


@dataclass(frozen=True)
class Rejected:
    path: Path
    reason: str


@dataclass
class Dataset:
    """The validated content of a data folder."""

    root: Path
    classes: list[str]
    samples: list[Sample]
    rejected: list[Rejected] = field(default_factory=list)
    fingerprint: str = ""

    def counts(self) -> list[int]:
        counts = [0] * len(self.classes)
        for sample in self.samples:
            counts[sample.label] += 1
        return counts

    def rejected_summary(self, first: int = 5) -> str:
        if not self.rejected:
            return ""
        shown = "; ".join(f"{r.path} ({r.reason})" for r in self.rejected[:first])
        more = f" and {len(self.rejected) - first} more" if len(self.rejected) > first else ""
        return f"skipped {len(self.rejected)} unreadable or unsupported file(s): {shown}{more}"


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


# ----------------------------------------------------------------------------- scanning


def list_classes(root: Path, min_classes: int = 2) -> list[str]:
    if not root.exists():
        raise DataError(f"data folder {root} does not exist")
    if not root.is_dir():
        raise DataError(f"{root} is not a folder: pass a folder with one sub-folder per class")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(
            f"{root} has no class sub-folders: put each class's images in <folder>/<class>/"
        )
    if len(classes) < min_classes:
        raise DataError(
            f"{root} has only one class ({classes[0]!r}): "
            "a classifier needs at least 2 class folders"
        )
    return classes


def _candidate_files(root: Path, classes: Sequence[str]) -> list[tuple[Path, int]]:
    files = []
    for label, name in enumerate(classes):
        for path in sorted((root / name).rglob("*")):
            if path.is_file() and not path.name.startswith("."):
                files.append((path, label))
    return files


def _decodable(paths: Sequence[Path], on_progress: Callable[[int], None] | None) -> set[int]:
    """Indices of the files the SHARED decoder can decode, found with the decoder itself (in
    parallel) so a file that passes here cannot fail mid-epoch."""
    import tensorflow as tf

    from training.preprocess import decode_rgb

    def probe(index: tf.Tensor, path: tf.Tensor) -> tf.Tensor:
        image = decode_rgb(tf.io.read_file(path))
        with tf.control_dependencies([tf.debugging.assert_positive(tf.size(image))]):
            return tf.identity(index)

    if not paths:
        return set()
    ds = tf.data.Dataset.from_tensor_slices((list(range(len(paths))), [str(p) for p in paths]))
    ds = ds.map(probe, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
    ok: set[int] = set()
    for index in ds.ignore_errors().as_numpy_iterator():
        ok.add(int(index))
        if on_progress:
            on_progress(1)
    return ok


def _serving_check(
    path: Path, content: bytes, work_dir: Path, max_pixels: int
) -> tuple[Path | None, str | None]:
    """Run serving's own upload check. Returns (re-encoded source or None, rejection reason)."""
    try:
        checked = check_image(content, max_pixels=max_pixels)
    except GraftError as error:
        return None, error.message.removeprefix("image 0 ").removeprefix("image 0: ")
    if not checked.reencoded:
        return None, None
    work_dir.mkdir(parents=True, exist_ok=True)
    source = work_dir / f"{hashlib.sha256(content).hexdigest()}.bmp"
    source.write_bytes(checked.data)
    return source, None


def scan(
    root: Path | str,
    work_dir: Path,
    *,
    max_pixels: int | None = None,
    for_training: bool = True,
    on_total: Callable[[int], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> Dataset:
    """Find, check, hash and decode-test every file under root/<class>/.

    Every file goes through `service.validation.check_image`, the check every upload passes in
    serving: what serving refuses is left out of training, and where serving re-encodes an
    image (EXIF orientation, BMPs TensorFlow misreads) training decodes the same re-encode,
    written to `work_dir`. Raises DataError when the folder cannot be trained on (with
    for_training=False: when it holds no readable image at all); unreadable
    or unsupported files are collected in `Dataset.rejected`, never raised mid-epoch.
    """
    from service.settings import GraftSettings

    max_pixels = max_pixels or GraftSettings().max_image_pixels
    root = Path(root).expanduser().resolve()
    classes = list_classes(root, min_classes=2 if for_training else 1)
    candidates = _candidate_files(root, classes)
    if on_total:
        on_total(2 * len(candidates))
    kept: list[tuple[Sample, str]] = []
    rejected: list[Rejected] = []
    for path, label in candidates:
        content = path.read_bytes()
        source, reason = _serving_check(path, content, work_dir, max_pixels)
        if on_progress:
            on_progress(1)
        if reason:
            rejected.append(Rejected(path, reason))
        else:
            kept.append((Sample(path, label, source), hashlib.sha256(content).hexdigest()))
    if on_total:
        on_total(len(candidates) + len(kept))
    decodable = _decodable([k[0].decode_path for k in kept], on_progress)
    samples, digests = [], []
    for index, (sample, digest) in enumerate(kept):
        if index in decodable:
            samples.append(sample)
            digests.append(
                (sample.path.relative_to(root).as_posix(), classes[sample.label], digest)
            )
        else:
            rejected.append(Rejected(sample.path, "cannot be decoded"))
    dataset = Dataset(root, classes, samples, rejected, fingerprint=fingerprint(digests))
    _check_usable(dataset, for_training)
    return dataset


def fingerprint(entries: Iterable[tuple[str, str, str]]) -> str:
    """sha256 over the sorted (relative path, class, sha256 of content) of every accepted file:
    renaming, relabelling, adding, removing or editing any image changes it; file times do not."""
    digest = hashlib.sha256()
    for rel, label, content_sha in sorted(entries):
        digest.update(f"{rel}\t{label}\t{content_sha}\n".encode())
    return "sha256:" + digest.hexdigest()


def _check_usable(dataset: Dataset, for_training: bool) -> None:
    if not dataset.samples:
        found = f" ({len(dataset.rejected)} file(s) unreadable)" if dataset.rejected else ""
        raise DataError(f"no readable images under {dataset.root}{found}")
    if not for_training:
        return
    small = [f"{c!r}: {n}" for c, n in zip(dataset.classes, dataset.counts(), strict=True) if n < 2]
    if small:
        raise DataError(
            "every class needs at least 2 readable images; too few in " + ", ".join(small)
        )


# ----------------------------------------------------------------------------- splitting


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


def class_weights(samples: Sequence[Sample], num_classes: int) -> dict[int, float]:
    """'Balanced' weights n / (C * n_c): every class contributes equally to the loss."""
    counts = [0] * num_classes
    for sample in samples:
        counts[sample.label] += 1
    total = sum(counts)
    return {c: (total / (num_classes * n) if n else 0.0) for c, n in enumerate(counts)}


# ----------------------------------------------------------------------------- tf.data


def load_pixels(path: tf.Tensor, image_size: int) -> tf.Tensor:
    """File path -> float32 [s, s, 3] in [0, 255], through the shared decode + resize."""
    import tensorflow as tf

    from training.preprocess import decode_and_resize

    return decode_and_resize(tf.io.read_file(path), image_size)


def image_dataset(
    samples: Sequence[Sample],
    image_size: int,
    *,
    batch_size: int,
    num_classes: int,
    shuffle_seed: int | None = None,
    augment: Callable | None = None,
) -> tf.data.Dataset:
    """(pixels float32 [b, s, s, 3], one-hot labels [b, C]) batches.

    Decoding runs in parallel; decoded pixels are cached in memory when they fit
    PIXEL_CACHE_BYTES. Shuffling uses a fixed seed and reshuffles every epoch, so the order of
    a run is reproducible; `augment` (training only) is applied per batch after the cache.
    """
    import tensorflow as tf

    paths = [str(s.decode_path) for s in samples]
    labels = tf.one_hot([s.label for s in samples], num_classes)
    ds = tf.data.Dataset.from_tensor_slices((paths, labels))
    ds = ds.map(lambda p, y: (load_pixels(p, image_size), y), num_parallel_calls=tf.data.AUTOTUNE)
    if len(samples) * image_size * image_size * 3 * 4 <= PIXEL_CACHE_BYTES:
        ds = ds.cache()
    if shuffle_seed is not None:
        ds = ds.shuffle(len(samples), seed=shuffle_seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)
    if augment is not None:
        ds = ds.map(lambda x, y: (augment(x, training=True), y), num_parallel_calls=1)
    return ds.prefetch(tf.data.AUTOTUNE)

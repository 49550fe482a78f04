"""Scan a folder of class sub-folders: find every file, pass it through serving's own upload
check, hash it and decode-test it, so a file that would fail mid-epoch is left out up front.

The result is a `Dataset`: the classes (sorted folder names), the accepted `Sample`s, the
rejected files with their reasons, and a content fingerprint of the whole folder.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from service.errors import GraftError
from service.image_check import check_image


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

"""Near-duplicate images across two splits, from pooled backbone features: a test image that
(nearly) also sits in the training split makes the test score say less than it seems to.

Each test image is compared with every training image by the cosine similarity of their pooled
features; its most similar training image is a near-duplicate when the similarity reaches
NEAR_DUPLICATE_SIMILARITY. `graft train` passes the trained classifier's pooled features, which
it has already: the training images' come from the feature cache (its first view, the images
themselves), the test images' from scoring the test split. No image goes through the network
again.

The work is one matrix product, test x train, done in row chunks of at most CHUNK_ELEMENTS
similarities so that memory stays bounded whatever the split sizes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Measured on plantvillage-apple (EfficientNet-Lite0 at 224 px, the default training; see
# docs/decisions.md): a copy of a test image scores >= 0.985 when re-encoded as JPEG (quality
# 70) and >= 0.968 when 15 % brighter; the same leaf photographed again scores 0.93-0.954;
# the most similar distinct leaves seen, 0.941. Flips, crops and resizes score lower (median
# 0.96, 0.94, 0.88): they are not caught.
NEAR_DUPLICATE_SIMILARITY = 0.95
CHUNK_ELEMENTS = 16 * 1024 * 1024  # similarities in flight at once: 64 MiB of float32


@dataclass(frozen=True)
class NearDuplicate:
    test: int  # index into the test features
    train: int  # index of its most similar training image
    similarity: float


def _unit_rows(features: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1 (an all-zero row stays zero: similar to nothing)."""
    features = np.asarray(features, dtype=np.float32).reshape(len(features), -1)
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return features / np.maximum(norms, np.float32(1e-12))


@dataclass(frozen=True)
class Nearest:
    """For every test image: its most similar training image and their cosine similarity."""

    train: np.ndarray  # int64 [test]: index into the training features
    similarity: np.ndarray  # float32 [test]; -1 where there is no training image

    def duplicates(self, threshold: float = NEAR_DUPLICATE_SIMILARITY) -> list[NearDuplicate]:
        """The test images whose most similar training image reaches `threshold`, most
        similar first."""
        found = np.flatnonzero(self.similarity >= threshold)
        order = found[np.argsort(-self.similarity[found], kind="stable")]
        return [NearDuplicate(int(i), int(self.train[i]), float(self.similarity[i])) for i in order]

    def closest_below(self, threshold: float, count: int) -> list[NearDuplicate]:
        """The `count` most similar pairs under `threshold`: the ones worth a look by eye."""
        below = np.flatnonzero((self.similarity < threshold) & (self.similarity > -1))
        order = below[np.argsort(-self.similarity[below], kind="stable")][:count]
        return [NearDuplicate(int(i), int(self.train[i]), float(self.similarity[i])) for i in order]


def nearest(train: np.ndarray, test: np.ndarray) -> Nearest:
    """Each test row's most similar training row by cosine similarity, in row chunks."""
    if len(train) == 0 or len(test) == 0:
        return Nearest(np.zeros(len(test), np.int64), np.full(len(test), -1.0, np.float32))
    train_unit, test_unit = _unit_rows(train), _unit_rows(test)
    if train_unit.shape[1] != test_unit.shape[1]:
        raise ValueError(
            f"train features have {train_unit.shape[1]} values and test features "
            f"{test_unit.shape[1]}: they must come from the same network"
        )
    rows = max(1, CHUNK_ELEMENTS // len(train_unit))
    best = np.empty(len(test_unit), np.int64)
    similarity = np.empty(len(test_unit), np.float32)
    for start in range(0, len(test_unit), rows):
        block = test_unit[start : start + rows] @ train_unit.T
        best[start : start + rows] = block.argmax(axis=1)
        similarity[start : start + rows] = block.max(axis=1)
    return Nearest(best, similarity)

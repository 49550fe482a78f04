"""Probabilities into answers: a request's `Prediction`, top-1, top-k, and per-image errors."""

from dataclasses import dataclass

import numpy as np

from service.errors import ExplanationsUnavailable, error_from_code
from service.schemas import UNKNOWN_LABEL, ImageResult, TopClass
from service.store.layout import OOD_FLAG_OUTPUT, OOD_SCORE_OUTPUT
from service.wire import InferResult


@dataclass(frozen=True)
class Prediction:
    model: str
    version: int
    labels: list[str]
    probabilities: np.ndarray  # float32 [n, C], one row per image in request order
    # The out-of-distribution score and flag of each image; None: the version has none.
    ood_score: np.ndarray | None = None  # float32 [n]
    in_distribution: np.ndarray | None = None  # bool [n]
    reject_unknown: bool = False  # flagged images are labelled UNKNOWN_LABEL

    def rejected(self) -> np.ndarray:
        """bool [n]: the images answered `unknown`."""
        if not self.reject_unknown or self.in_distribution is None:
            return np.zeros(len(self.probabilities), bool)
        return ~self.in_distribution

    def top1(self) -> tuple[list[str], list[float]]:
        """The most probable label of each image (`unknown` where rejected) and its
        probability."""
        top = self.probabilities.argmax(axis=1)
        scores = self.probabilities[np.arange(len(top)), top]
        rejected = self.rejected()
        labels = [UNKNOWN_LABEL if rejected[n] else self.labels[i] for n, i in enumerate(top)]
        return labels, scores.tolist()

    def ood_columns(self) -> dict[str, list]:
        """{"ood_score": [...], "in_distribution": [...]} (the signatures' output names) where
        the version has them, else {}."""
        if self.ood_score is None or self.in_distribution is None:
            return {}
        return {
            OOD_SCORE_OUTPUT: self.ood_score.tolist(),
            OOD_FLAG_OUTPUT: self.in_distribution.tolist(),
        }

    def image_results(self, k: int) -> list[ImageResult]:
        """Every image's top-1, its `k` most probable classes and its OOD score and flag."""
        results = [image_result(row, self.labels, k) for row in self.probabilities]
        if self.ood_score is None or self.in_distribution is None:
            return results
        rejected = self.rejected()
        return [
            result.model_copy(
                update={
                    "ood_score": float(score),
                    "in_distribution": bool(flag),
                    **({"label": UNKNOWN_LABEL} if reject else {}),
                }
            )
            for result, score, flag, reject in zip(
                results, self.ood_score, self.in_distribution, rejected, strict=True
            )
        ]

    @classmethod
    def of(
        cls, model: str, version: int, labels: list[str], results: list[InferResult],
        reject_unknown: bool = False,
    ) -> "Prediction":  # fmt: skip
        """The successful `results` of one request as a Prediction (the OOD arrays only when
        every image has them: one version answers a whole request)."""
        probabilities = np.stack([r.array() for r in results])
        scores = [r.ood_score for r in results]
        flags = [r.in_distribution for r in results]
        if any(s is None for s in scores) or any(f is None for f in flags):
            return cls(model, version, labels, probabilities, reject_unknown=reject_unknown)
        return cls(
            model, version, labels, probabilities,
            np.asarray(scores, np.float32), np.asarray(flags, bool), reject_unknown,
        )  # fmt: skip


def image_result(row: np.ndarray, labels: list[str], k: int) -> ImageResult:
    """One image's top-1 and its `k` most probable classes (ties keep label order)."""
    order = np.argsort(-row, kind="stable")[:k]
    top = [TopClass(label=labels[i], score=float(row[i])) for i in order]
    return ImageResult(label=top[0].label, score=top[0].score, top_k=top)


def raise_first_error(results: list[InferResult]) -> None:
    """A request fails with its first failed image; with several images the message names it."""
    for index, result in enumerate(results):
        if result.error_code is not None:
            message = result.error or "inference failed"
            error = error_from_code(result.error_code, message)
            # Only an error of one image names it: the version lacking explanations is every
            # image's.
            per_image = not isinstance(error, ExplanationsUnavailable)
            if len(results) > 1 and error.http_status == 400 and per_image:
                error = error_from_code(result.error_code, f"image {index}: {message}")
            raise error

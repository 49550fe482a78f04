"""Probabilities into answers: a request's `Prediction`, top-1, top-k, and per-image errors."""

from dataclasses import dataclass

import numpy as np

from service.errors import error_from_code
from service.schemas import ImageResult, TopClass
from service.wire import InferResult


@dataclass(frozen=True)
class Prediction:
    model: str
    version: int
    labels: list[str]
    probabilities: np.ndarray  # float32 [n, C], one row per image in request order

    def top1(self) -> tuple[list[str], list[float]]:
        """The most probable label of each image and its probability."""
        top = self.probabilities.argmax(axis=1)
        scores = self.probabilities[np.arange(len(top)), top]
        return [self.labels[i] for i in top], scores.tolist()


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
            if len(results) > 1 and error.http_status == 400:
                error = error_from_code(result.error_code, f"image {index}: {message}")
            raise error

"""Explained results into answers: top classes and the heatmap PNGs of each image.

The heatmaps come from the inference side (the version's `explain` signature); rendering them
(colour map, blending over the image, PNG encoding) costs CPU, so `explain_response` runs in a
worker thread, never on the event loop.
"""

import base64
from dataclasses import dataclass

from service.gateway.results import Prediction
from service.heatmap import heatmap_png, overlay_png
from service.schemas import ExplainResponse, ImageExplanation, ImageResult
from service.wire import InferResult


@dataclass(frozen=True)
class Served:
    """A request's successful results, with what turns them into an answer."""

    model: str
    version: int
    labels: list[str]
    images: list[bytes]  # the checked images, in request order (what the model saw)
    results: list[InferResult]  # one per image, none failed


def explain_response(served: Served, prediction: Prediction, top_k: int) -> ExplainResponse:
    """The /explain answer for `served` (explained items) and their `prediction` (classify's
    labels, `unknown` included): CPU work, call in a thread."""
    k = min(top_k, len(served.labels))
    rows = zip(served.images, served.results, prediction.image_results(k), strict=True)
    return ExplainResponse(
        model=served.model,
        version=served.version,
        explanations=[_explanation(image, result, top) for image, result, top in rows],
    )


def _explanation(image: bytes, result: InferResult, top: ImageResult) -> ImageExplanation:
    heatmap = result.heatmap_array()
    return ImageExplanation(
        label=top.label,
        score=top.score,
        top_k=top.top_k,
        in_distribution=top.in_distribution,  # None: a version without the flag
        heatmap_png=_b64(heatmap_png(heatmap)),
        overlay_png=_b64(overlay_png(image, heatmap)),
    )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")

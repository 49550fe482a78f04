"""Explanations from an exported SavedModel: its own `explain` signature, rendered as PNGs.

There is one Grad-CAM: the graph baked into the export (training.gradcam). This module only
calls it, for `graft explain` and the training report, and renders its heatmaps with the
rendering the service uses (service.heatmap).
"""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.errors import ExplanationsUnavailable, InvalidImage
from service.heatmap import heatmap_png, overlay_png
from service.store.layout import EXPLAIN_OUTPUTS, EXPLAIN_SIGNATURE

_BATCH = 16  # images per call of the signature

Explainer = Callable[[list[bytes]], dict[str, np.ndarray]]


@dataclass(frozen=True)
class Explanation:
    probabilities: np.ndarray  # float32 [C]
    heatmap: np.ndarray  # float32 [s, s] in [0, 1], s = the model's image size
    overlay_png: bytes  # the heatmap's colours over the image resized to s x s
    heatmap_png: bytes  # the heatmap in grey


def explain_images(saved_model_dir: Path, images: list[bytes]) -> list[Explanation]:
    """One Explanation per encoded image, in order. ExplanationsUnavailable for an export made
    before explanations; InvalidImage if an image cannot be decoded."""
    explain = load_explainer(saved_model_dir)
    explanations: list[Explanation] = []
    for start in range(0, len(images), _BATCH):
        chunk = images[start : start + _BATCH]
        outputs = explain(chunk)
        explanations += [
            render(image, probabilities, heatmap)
            for image, probabilities, heatmap in zip(
                chunk, outputs["probabilities"], outputs["heatmap"], strict=True
            )
        ]
    return explanations


def render(image: bytes, probabilities: np.ndarray, heatmap: np.ndarray) -> Explanation:
    return Explanation(
        probabilities=probabilities,
        heatmap=heatmap,
        overlay_png=overlay_png(image, heatmap),
        heatmap_png=heatmap_png(heatmap),
    )


def load_explainer(saved_model_dir: Path, what: str | None = None) -> Explainer:
    """The export's `explain` signature as a function of encoded images -> its outputs;
    ExplanationsUnavailable, naming it `what` (default: the folder), if it has none."""
    import tensorflow as tf

    module = tf.saved_model.load(str(saved_model_dir))
    if EXPLAIN_SIGNATURE not in module.signatures:
        raise ExplanationsUnavailable.of(what or str(saved_model_dir))

    def explain(images: list[bytes]) -> dict[str, np.ndarray]:
        signature = module.signatures[EXPLAIN_SIGNATURE]  # `module` keeps its variables alive
        try:
            outputs = signature(images=tf.constant(images, dtype=tf.string))
        except tf.errors.InvalidArgumentError:
            raise InvalidImage("the model's decoder cannot read it; is it damaged?") from None
        return {key: outputs[key].numpy().astype(np.float32) for key in EXPLAIN_OUTPUTS}

    return explain

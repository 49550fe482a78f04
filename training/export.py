"""Export a trained Keras classifier as a self-contained, TF-Serving-compatible SavedModel.

The SavedModel carries its own preprocessing: `serving_default` decodes and resizes encoded
images with `training.preprocess.decode_batch`, the very function the training input pipeline
uses, so serving cannot drift from training. Nothing from graft is needed to load it:
`tf.saved_model.load(path).signatures["serving_default"](images=...)` works anywhere, and so
does TensorFlow Serving pointed at the model repository.
"""

import platform
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from service import __version__
from service.store.layout import (
    EXPLAIN_SIGNATURE,
    LABELS_FILE,
    ONNX_FILE,
    ONNX_OUTPUT,
    OOD_FLAG_OUTPUT,
    OOD_SCORE_OUTPUT,
    PIXELS_SIGNATURE,
    PREPROCESS_SIGNATURE,
    SERVING_SIGNATURE,
    SIGNATURES,
)
from service.store.manifest import Manifest, hash_tree
from training.gradcam import GradCam
from training.onnx_export import write_onnx
from training.ood import OodDetector, named_outputs, with_ood
from training.preprocess import decode_batch, resize_pixels


def export_model(
    model: keras.Model,
    export_dir: Path,
    *,
    labels: Sequence[str],
    image_size: int,
    backbone: str,
    metrics: dict[str, Any] | None = None,
    dataset_fingerprint: str | None = None,
    accelerated: bool = True,
    ood: OodDetector | None = None,
) -> Path:
    """Write `model` (float32 [n, s, s, 3] pixels in [0, 255] -> softmax [n, C]) to `export_dir`.

    Signatures (both return `probabilities` float32 [n, C], `label` string [n], `score`
    float32 [n]):
      - serving_default(images: string [n]): encoded JPEG / PNG / BMP / GIF (first frame);
        grayscale, palette and RGBA become RGB; resized to `image_size` inside the graph.
      - serve_pixels(pixels: uint8 [n, h, w, 3]): RGB pixels of ANY size h x w (all images in
        one call share it); resized to `image_size` with the training resize.
    And `preprocess(images: string [n]) -> pixels float32 [n, s, s, 3]`, the decode + resize of
    serving_default alone, which an accelerated runtime runs before the network, and
    `explain(images: string [n]) -> probabilities [n, C], heatmap float32 [n, s, s] in [0, 1]`:
    the Grad-CAM of each image's top-1 class on the backbone's last convolutional block
    (training.gradcam), which `POST /explain` and `graft explain` return.
    With `accelerated`, the network also goes to onnx/model.onnx (pixels -> probabilities).
    With `ood` (training.ood), both signatures and the ONNX network also return `ood_score`
    float32 [n] and `in_distribution` bool [n], and graft.json records the detector's `ood`.
    Also writes assets/labels.txt and a draft graft.json (name and version are set at publish).
    The folder appears complete or not at all: it is written beside `export_dir` and renamed.
    """
    model = with_ood(model, ood) if ood is not None else model
    labels = _checked_labels(labels, model, image_size)
    export_dir = Path(export_dir)
    _refuse_non_empty(export_dir)
    staging = export_dir.parent / f".export-{uuid.uuid4().hex}"
    export_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        _write_saved_model(model, staging, labels, image_size)
        (staging / LABELS_FILE).parent.mkdir(exist_ok=True)
        (staging / LABELS_FILE).write_text("".join(f"{label}\n" for label in labels), "utf-8")
        onnx = (
            write_onnx(model, image_size, ONNX_OUTPUT, staging / ONNX_FILE) if accelerated else None
        )
        Manifest(
            backbone=backbone,
            image_size=image_size,
            labels=labels,
            metrics=metrics or {},
            dataset_fingerprint=dataset_fingerprint,
            framework=_framework_versions(),
            signatures=[*SIGNATURES, PREPROCESS_SIGNATURE, EXPLAIN_SIGNATURE],
            files=hash_tree(staging),
            accelerated=onnx,
            ood=ood.manifest() if ood is not None else None,
        ).write(staging)
        if export_dir.exists():
            export_dir.rmdir()
        staging.rename(export_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return export_dir


def _write_saved_model(model: keras.Model, path: Path, labels: list[str], image_size: int) -> None:
    def outputs(pixels: tf.Tensor) -> dict[str, tf.Tensor]:
        return answers(model(pixels, training=False))

    def answers(model_outputs: Any) -> dict[str, tf.Tensor]:
        """What the signatures return of what the model returns."""
        named = named_outputs(model_outputs)
        probabilities = tf.cast(named[ONNX_OUTPUT], tf.float32)
        best = tf.argmax(probabilities, axis=-1, output_type=tf.int32)
        ood = {  # with_ood models: the out-of-distribution score and flag
            OOD_SCORE_OUTPUT: tf.cast(named[OOD_SCORE_OUTPUT], tf.float32),
            OOD_FLAG_OUTPUT: tf.cast(named[OOD_FLAG_OUTPUT], tf.bool),
        } if OOD_SCORE_OUTPUT in named else {}  # fmt: skip
        return {
            "probabilities": probabilities,
            "label": tf.gather(tf.constant(labels), best),
            "score": tf.reduce_max(probabilities, axis=-1),
            **ood,
        }

    def serve_images(images: tf.Tensor) -> dict[str, tf.Tensor]:
        return outputs(decode_batch(images, image_size))

    def serve_pixels(pixels: tf.Tensor) -> dict[str, tf.Tensor]:
        return outputs(resize_pixels(pixels, image_size))

    def preprocess(images: tf.Tensor) -> dict[str, tf.Tensor]:
        return {"pixels": decode_batch(images, image_size)}

    gradcam = GradCam.of(model)

    def explain(images: tf.Tensor) -> dict[str, tf.Tensor]:
        model_outputs, heatmap = gradcam(decode_batch(images, image_size), image_size)
        return {**answers(model_outputs), "heatmap": heatmap}

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        SERVING_SIGNATURE,
        serve_images,
        input_signature=[tf.TensorSpec([None], tf.string, name="images")],
    )
    archive.add_endpoint(
        PIXELS_SIGNATURE,
        serve_pixels,
        input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name="pixels")],
    )
    archive.add_endpoint(
        PREPROCESS_SIGNATURE,
        preprocess,
        input_signature=[tf.TensorSpec([None], tf.string, name="images")],
    )
    archive.add_endpoint(
        EXPLAIN_SIGNATURE,
        explain,
        input_signature=[tf.TensorSpec([None], tf.string, name="images")],
    )
    archive.write_out(str(path), verbose=False)


def _checked_labels(labels: Sequence[str], model: keras.Model, image_size: int) -> list[str]:
    """Labels must be distinct single lines, one per model output, and the model must output
    probabilities (the `score` output and every client assume so)."""
    labels = [str(label) for label in labels]
    if not labels or any(not label.strip() or "\n" in label or "\r" in label for label in labels):
        raise ValueError("labels must be a non-empty list of non-blank, single-line names")
    if len(set(labels)) != len(labels):
        raise ValueError("labels must be distinct")
    outputs = model(np.zeros([1, image_size, image_size, 3], np.float32), training=False)
    probe = np.asarray(named_outputs(outputs)[ONNX_OUTPUT])
    if probe.shape != (1, len(labels)):
        raise ValueError(
            f"the model outputs shape {probe.shape[1:]} for one image but there are "
            f"{len(labels)} labels; they must match"
        )
    if not np.isclose(probe.sum(), 1.0, atol=1e-3) or probe.min() < 0:
        raise ValueError("the model must output softmax probabilities (end it with a softmax)")
    return labels


def _refuse_non_empty(export_dir: Path) -> None:
    if export_dir.exists() and (not export_dir.is_dir() or any(export_dir.iterdir())):
        raise FileExistsError(f"{export_dir} already exists and is not an empty folder")


def _framework_versions() -> dict[str, str]:
    return {
        "graft": __version__,
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "python": platform.python_version(),
    }

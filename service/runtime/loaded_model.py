"""One loaded, verified and warmed-up model version.

`LoadedModel.load` is the only way in, and it refuses a version unless every check passes:
manifest hashes (through the repository), the `serving_default` signature's input and output
shapes, label count == output width, and a warm-up on real encoded images whose probabilities
are finite and sum to 1. The version manager swaps a version in only after this returns.
"""

from dataclasses import dataclass
from typing import Any

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import types_pb2

from service.errors import InvalidImage, RejectedModel
from service.store.layout import OUTPUTS, SERVING_SIGNATURE
from service.store.manifest import Manifest
from service.store.repository import ModelRepository

_WARMUP_IMAGES = 3
_SUM_TOLERANCE = 1e-3


@dataclass(frozen=True)
class LoadedModel:
    name: str
    version: int
    manifest: Manifest
    signatures: dict[str, dict[str, Any]]  # TF Serving style signature_def, for metadata routes
    _module: Any  # keeps the SavedModel's variables alive as long as the function is used
    _serve: Any

    @property
    def labels(self) -> list[str]:
        return self.manifest.labels

    @property
    def image_size(self) -> int:
        return self.manifest.image_size

    @classmethod
    def load(cls, repository: ModelRepository, name: str, version: int) -> "LoadedModel":
        """Verify, load and warm up `name`/`version`; RejectedModel says why it cannot serve."""
        manifest = repository.verify(name, version)
        try:
            module = tf.saved_model.load(str(repository.version_dir(name, version)))
        except (OSError, ValueError, tf.errors.OpError) as exc:
            raise RejectedModel(f"{name} v{version}: TensorFlow cannot load it: {exc}") from exc
        if SERVING_SIGNATURE not in module.signatures:
            raise RejectedModel(
                f"{name} v{version} has no {SERVING_SIGNATURE!r} signature "
                f"(found {sorted(module.signatures)}); export it with `graft train` or "
                "training.export.export_model"
            )
        serve = module.signatures[SERVING_SIGNATURE]
        _check_signature(name, version, serve, len(manifest.labels))
        model = cls(name, version, manifest, _signature_defs(module.signatures), module, serve)
        model.warm_up()
        return model

    def predict(self, images: list[bytes]) -> np.ndarray:
        """Encoded images -> float32 probabilities [n, C]. InvalidImage if any fails to decode."""
        try:
            outputs = self._serve(images=tf.constant(images, dtype=tf.string))
        except tf.errors.InvalidArgumentError as exc:
            raise InvalidImage(f"the image cannot be decoded: {_first_line(exc.message)}") from exc
        return outputs["probabilities"].numpy().astype(np.float32, copy=False)

    def warm_up(self) -> None:
        """Run real inferences (PNG and JPEG) and insist on a probability distribution."""
        images = _warmup_images(self.image_size)
        try:
            probabilities = self.predict(images)
        except InvalidImage as exc:
            raise RejectedModel(f"{self.name} v{self.version}: warm-up failed: {exc}") from exc
        expected = (len(images), len(self.labels))
        if probabilities.shape != expected:
            raise RejectedModel(
                f"{self.name} v{self.version}: warm-up returned shape {probabilities.shape}, "
                f"expected {expected}"
            )
        if not np.isfinite(probabilities).all():
            raise RejectedModel(f"{self.name} v{self.version}: warm-up gave NaN or infinity")
        sums = probabilities.sum(axis=1)
        if not np.allclose(sums, 1.0, atol=_SUM_TOLERANCE):
            raise RejectedModel(
                f"{self.name} v{self.version}: warm-up probabilities sum to {sums.tolist()}, "
                "not 1; the model must end in a softmax"
            )


def _check_signature(name: str, version: int, serve: Any, n_labels: int) -> None:
    _, inputs = serve.structured_input_signature
    spec = inputs.get("images")
    if spec is None or spec.dtype != tf.string or spec.shape.rank != 1:
        raise RejectedModel(
            f"{name} v{version}: {SERVING_SIGNATURE} must take `images`: tf.string [None], "
            f"got {inputs}"
        )
    outputs = serve.structured_outputs
    missing = [key for key in OUTPUTS if key not in outputs]
    if missing:
        raise RejectedModel(f"{name} v{version}: {SERVING_SIGNATURE} lacks outputs {missing}")
    width = outputs["probabilities"].shape[-1]
    if width != n_labels:
        raise RejectedModel(
            f"{name} v{version}: the model outputs {width} probabilities but the manifest "
            f"has {n_labels} labels"
        )


def _signature_defs(signatures: Any) -> dict[str, dict[str, Any]]:
    """The signatures in TF Serving's JSON metadata shape (`GetModelMetadata` / REST)."""
    return {
        key: {
            "inputs": _tensor_infos(fn.structured_input_signature[1]),
            "outputs": _tensor_infos(fn.structured_outputs),
            "method_name": "tensorflow/serving/predict",
        }
        for key, fn in signatures.items()
    }


def _tensor_infos(specs: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        key: {
            "dtype": types_pb2.DataType.Name(spec.dtype.as_datatype_enum),
            "tensor_shape": {
                "dim": [{"size": str(-1 if d is None else d), "name": ""} for d in spec.shape]
            },
            "name": key,
        }
        for key, spec in specs.items()
    }


def _warmup_images(image_size: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(_WARMUP_IMAGES, image_size, image_size, 3), dtype=np.uint8)
    encoded = [tf.io.encode_png(p).numpy() for p in pixels[:-1]]
    return [*encoded, tf.io.encode_jpeg(pixels[-1]).numpy()]


def _first_line(message: str) -> str:
    return message.strip().splitlines()[0] if message.strip() else "unknown decode error"

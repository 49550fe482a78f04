"""One loaded, verified and warmed-up model version, on TensorFlow or an accelerated runtime.

`LoadedModel.load` is the only way in, and it refuses a version unless every check passes:
manifest hashes (through the repository), the `serving_default` signature's input and output
shapes, label count == output width, and a warm-up on real encoded images whose probabilities
are finite and sum to 1. The version manager swaps a version in only after this returns.

On an accelerated runtime (service.runtime.networks) a version runs its SavedModel's
`preprocess` signature (the training decode + resize) and then its ONNX network. It must first
agree with its own `serving_default` on the warm-up images, or it is refused: never silently
different numbers. A version without the ONNX file, or whose runtime cannot start here, runs on
TensorFlow, and says why in `runtime_note`.
"""

import logging
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import types_pb2

from service import metrics
from service.errors import InvalidImage, RejectedModel
from service.runtime.devices import grow_gpu_memory
from service.runtime.graph_ops import refuse_unlisted_ops
from service.runtime.networks import (
    TENSORFLOW,
    Engine,
    Network,
    RuntimeUnavailable,
    open_network,
)
from service.store.layout import ONNX_FILE, OUTPUTS, PREPROCESS_SIGNATURE, SERVING_SIGNATURE
from service.store.manifest import Manifest
from service.store.repository import ModelRepository

logger = logging.getLogger("graft.runtime")
grow_gpu_memory()  # before any model of this process touches a GPU

_WARMUP_IMAGES = 3
_SUM_TOLERANCE = 1e-3
# How far an accelerated runtime may stray from the SavedModel (max |difference| of any
# probability); measured differences are ~1e-6 (float32 kernels summing in another order).
AGREEMENT_TOLERANCE = 1e-4


@dataclass(frozen=True)
class LoadedModel:
    name: str
    version: int
    manifest: Manifest
    signatures: dict[str, dict[str, Any]]  # TF Serving style signature_def, for metadata routes
    _module: Any  # keeps the SavedModel's variables alive as long as the function is used
    _serve: Any
    _network: Network | None = None
    runtime_note: str | None = None  # why the version is not on the runtime it was asked for
    device: str = "cpu"  # what runs the network: cpu or gpu:N

    @property
    def runtime(self) -> str:
        return self._network.runtime if self._network is not None else TENSORFLOW

    @property
    def labels(self) -> list[str]:
        return self.manifest.labels

    @property
    def image_size(self) -> int:
        return self.manifest.image_size

    @classmethod
    def load(
        cls, repository: ModelRepository, name: str, version: int, engine: Engine = Engine()
    ) -> "LoadedModel":
        """Verify, load and warm up `name`/`version` on `engine`; RejectedModel says why it
        cannot serve."""
        manifest = repository.verify(name, version)
        refuse_unlisted_ops(repository.version_dir(name, version))  # volume-published too
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
        model = cls(
            name,
            version,
            manifest,
            _signature_defs(module.signatures),
            module,
            serve,
            device=str(engine.device),
        )
        model.warm_up()
        if engine.runtime == TENSORFLOW:
            return model
        accelerated = model._accelerated(repository, engine)
        if accelerated.runtime == TENSORFLOW:
            metrics.RUNTIME_FALLBACKS.labels(name, engine.runtime).inc()
        return accelerated

    def _accelerated(self, repository: ModelRepository, engine: Engine) -> "LoadedModel":
        """This version on `engine`'s runtime once it agrees with serving_default, or on
        TensorFlow with the reason when the version or this machine cannot run it there."""
        label = f"{self.name} v{self.version}"
        if self.manifest.accelerated is None:
            return self._on_tensorflow(
                f"{label} has no accelerated file ({ONNX_FILE}); add one with "
                f"`graft export-onnx {self.name} {self.version}`"
            )
        if PREPROCESS_SIGNATURE not in self._module.signatures:
            return self._on_tensorflow(f"{label} has no {PREPROCESS_SIGNATURE!r} signature")
        path = repository.version_dir(self.name, self.version) / self.manifest.accelerated.file
        try:
            network = open_network(engine.runtime, path, engine.threads, engine.device)
        except RuntimeUnavailable as exc:
            logger.warning("%s runs on TensorFlow: %s", label, exc)
            return self._on_tensorflow(f"{engine.runtime} is unavailable: {exc}")
        accelerated = replace(self, _network=network)
        accelerated.agree_with_saved_model()
        return accelerated

    def _on_tensorflow(self, note: str) -> "LoadedModel":
        return replace(self, runtime_note=note)

    def predict(self, images: list[bytes]) -> np.ndarray:
        """Encoded images -> float32 probabilities [n, C]. InvalidImage if any fails to decode."""
        if self._network is None:
            return self._run(self._serve, images, "probabilities")
        return self._network.run(self._run(self._preprocess, images, "pixels"))

    @property
    def _preprocess(self) -> Any:
        return self._module.signatures[PREPROCESS_SIGNATURE]

    def _run(self, signature: Any, images: list[bytes], output: str) -> np.ndarray:
        try:
            # On a GPU, TensorFlow places what it can there and decodes on the CPU.
            with tf.device("/CPU:0" if self.device == "cpu" else f"/{self.device.upper()}"):
                outputs = signature(images=tf.constant(images, dtype=tf.string))
        except tf.errors.InvalidArgumentError as exc:
            raise InvalidImage(f"the image cannot be decoded: {_first_line(exc.message)}") from exc
        return outputs[output].numpy().astype(np.float32, copy=False)

    def agree_with_saved_model(self) -> None:
        """RejectedModel unless the accelerated network gives the SavedModel's numbers on the
        warm-up images: every probability within AGREEMENT_TOLERANCE, the same top-1 wherever
        the SavedModel's top two are further apart than that."""
        images = _warmup_images(self.image_size)
        try:
            fast = self.predict(images)
        except Exception as exc:  # onnxruntime / openvino raise their own types
            raise RejectedModel(
                f"{self.name} v{self.version}: {self.runtime} fails on the warm-up images: "
                f"{_first_line(str(exc))}"
            ) from exc
        reference = self._run(self._serve, images, "probabilities")
        if fast.shape != reference.shape:
            raise RejectedModel(
                f"{self.name} v{self.version}: {self.runtime} returns shape {fast.shape}, the "
                f"SavedModel {reference.shape}; {ONNX_FILE} is not this version's network"
            )
        difference = float(np.abs(fast - reference).max())
        flipped = bool(np.any((fast.argmax(1) != reference.argmax(1)) & _decided(reference)))
        if difference > AGREEMENT_TOLERANCE or flipped:
            raise RejectedModel(
                f"{self.name} v{self.version}: {self.runtime} disagrees with the SavedModel on "
                f"the warm-up images (max |difference| {difference:.2g}, limit "
                f"{AGREEMENT_TOLERANCE:g}{', another top-1' if flipped else ''}); {ONNX_FILE} "
                "is not this version's network: re-export it, or serve with "
                "GRAFT_RUNTIME=tensorflow"
            )

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


def _decided(probabilities: np.ndarray) -> np.ndarray:
    """Rows whose top two probabilities are further apart than AGREEMENT_TOLERANCE: there,
    and only there, numbers within tolerance cannot swap the top-1."""
    top_two = np.sort(probabilities, axis=1)[:, -2:]
    return top_two[:, -1] - top_two[:, 0] > AGREEMENT_TOLERANCE


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

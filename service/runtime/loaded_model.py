"""One loaded, verified and warmed-up model version, on TensorFlow or an accelerated runtime.

`LoadedModel.load` is the only way in, and it refuses a version unless every check passes:
manifest hashes (through the repository), the `serving_default` signature's input and output
shapes, label count == output width, and a warm-up on real encoded images whose probabilities
are finite and sum to 1. The version manager swaps a version in only after this returns.

On an accelerated runtime (service.runtime.networks) a version runs its SavedModel's
`preprocess` signature (the training decode + resize; a batch's images split over the decode
pool's threads, service.runtime.decode_pool) and then its ONNX network. It must first
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
from service.errors import ExplanationsUnavailable, InvalidImage, RejectedModel
from service.runtime.decode_pool import SERIAL, DecodePool, configure_tensorflow, shared_pool
from service.runtime.devices import grow_gpu_memory
from service.runtime.graph_ops import refuse_unlisted_ops
from service.runtime.networks import (
    TENSORFLOW,
    Engine,
    Network,
    RuntimeUnavailable,
    open_network,
)
from service.store.layout import (
    EXPLAIN_OUTPUTS,
    EXPLAIN_SIGNATURE,
    ONNX_FILE,
    ONNX_OUTPUT,
    OOD_FLAG_OUTPUT,
    OOD_OUTPUTS,
    OOD_SCORE_OUTPUT,
    OUTPUTS,
    PREPROCESS_SIGNATURE,
    SERVING_SIGNATURE,
)
from service.store.manifest import Manifest
from service.store.repository import ModelRepository

logger = logging.getLogger("graft.runtime")
grow_gpu_memory()  # before any model of this process touches a GPU

_WARMUP_IMAGES = 3
_SUM_TOLERANCE = 1e-3
# How far an accelerated runtime may stray from the SavedModel (max |difference| of any
# probability); measured differences are ~1e-6 (float32 kernels summing in another order).
AGREEMENT_TOLERANCE = 1e-4
# How far its ood_score may stray, relative to the score (scores of noise run into the
# hundreds); measured differences are ~1e-6 of it.
OOD_AGREEMENT_TOLERANCE = 1e-3


@dataclass(frozen=True)
class Outputs:
    """What one call gives for n images: probabilities, and the out-of-distribution score and
    flag of a version that has them (None for versions exported before them)."""

    probabilities: np.ndarray  # float32 [n, C]
    ood_score: np.ndarray | None = None  # float32 [n]
    in_distribution: np.ndarray | None = None  # bool [n]


@dataclass(frozen=True)
class LoadedModel:
    name: str
    version: int
    manifest: Manifest
    signatures: dict[str, dict[str, Any]]  # TF Serving style signature_def, for metadata routes
    _module: Any  # keeps the SavedModel's variables alive as long as the function is used
    _serve: Any
    _network: Network | None = None
    _decoder: DecodePool = SERIAL  # who runs `preprocess` over a batch on an accelerated runtime
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
        if engine.runtime != TENSORFLOW:
            configure_tensorflow(engine.decode_threads)  # before TensorFlow's first op
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
        if self.has_ood and not set(OOD_OUTPUTS) <= set(network.output_names):
            return self._on_tensorflow(
                f"{label}: {ONNX_FILE} lacks the out-of-distribution outputs its SavedModel has "
                f"({', '.join(OOD_OUTPUTS)}); re-export it with `graft train`"
            )
        accelerated = replace(self, _network=network, _decoder=shared_pool(engine.decode_threads))
        accelerated.agree_with_saved_model()
        return accelerated

    def _on_tensorflow(self, note: str) -> "LoadedModel":
        return replace(self, runtime_note=note)

    @property
    def has_ood(self) -> bool:
        """Whether `serving_default` outputs `ood_score` and `in_distribution` (exports
        trained before the out-of-distribution flag do not)."""
        return all(key in self._serve.structured_outputs for key in OOD_OUTPUTS)

    def infer(self, images: list[bytes]) -> Outputs:
        """Encoded images -> probabilities, with the OOD score and flag where the version has
        them: one call of `serving_default`, or of the network after `preprocess`."""
        if not self.has_ood:
            return Outputs(self.predict(images))
        if self._network is None:
            got = self._outputs(self._serve, images, (ONNX_OUTPUT, *OOD_OUTPUTS))
        else:
            got = self._network.outputs(self.decode(images))
        return Outputs(
            np.asarray(got[ONNX_OUTPUT], np.float32),
            np.asarray(got[OOD_SCORE_OUTPUT], np.float32).reshape(-1),
            np.asarray(got[OOD_FLAG_OUTPUT], bool).reshape(-1),
        )

    def predict(self, images: list[bytes]) -> np.ndarray:
        """Encoded images -> float32 probabilities [n, C]. InvalidImage if any fails to decode."""
        if self._network is None:
            return self._run(self._serve, images, "probabilities")
        return self._network.run(self.decode(images))

    def decode(self, images: list[bytes]) -> np.ndarray:
        """The float32 pixels [n, s, s, 3] the network gets: the version's `preprocess`
        signature over `images`, split over the decode pool's threads."""
        return self._decoder.decode(self._pixels, images)

    def _pixels(self, images: list[bytes]) -> np.ndarray:
        return self._run(self._preprocess, images, "pixels")

    @property
    def _preprocess(self) -> Any:
        return self._module.signatures[PREPROCESS_SIGNATURE]

    @property
    def explainable(self) -> bool:
        """Whether the export has the `explain` signature (exports made before it do not)."""
        return EXPLAIN_SIGNATURE in self._module.signatures

    def explain(self, images: list[bytes]) -> tuple[Outputs, np.ndarray]:
        """Encoded images -> (what `infer` gives, Grad-CAM heatmaps [n, s, s] in [0, 1]), from
        one call of the version's own `explain` signature: on TensorFlow, whatever runs its
        network for classification (the gradient is TensorFlow's). ExplanationsUnavailable
        for an export made before explanations; InvalidImage if any image fails to decode."""
        if not self.explainable:
            raise ExplanationsUnavailable.of(f"model {self.name!r} version {self.version}")
        signature = self._module.signatures[EXPLAIN_SIGNATURE]
        ood = self.has_ood and set(OOD_OUTPUTS) <= set(signature.structured_outputs)
        got = self._outputs(signature, images, (*EXPLAIN_OUTPUTS, *(OOD_OUTPUTS if ood else ())))
        outputs = Outputs(got["probabilities"])
        if ood:
            outputs = Outputs(
                got["probabilities"],
                got[OOD_SCORE_OUTPUT].reshape(-1),
                got[OOD_FLAG_OUTPUT].astype(bool).reshape(-1),
            )
        return outputs, got["heatmap"]

    def _run(self, signature: Any, images: list[bytes], output: str) -> np.ndarray:
        return self._outputs(signature, images, (output,))[output]

    def _outputs(
        self, signature: Any, images: list[bytes], keys: tuple[str, ...]
    ) -> dict[str, np.ndarray]:
        try:
            # On a GPU, TensorFlow places what it can there and decodes on the CPU.
            with tf.device("/CPU:0" if self.device == "cpu" else f"/{self.device.upper()}"):
                outputs = signature(images=tf.constant(images, dtype=tf.string))
        except tf.errors.InvalidArgumentError as exc:
            raise InvalidImage(f"the image cannot be decoded: {_first_line(exc.message)}") from exc
        values = {key: outputs[key].numpy() for key in keys}
        return {  # in_distribution stays bool
            key: value if value.dtype == bool else value.astype(np.float32, copy=False)
            for key, value in values.items()
        }

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
        if self.has_ood:
            self._agree_on_ood(images)

    def _agree_on_ood(self, images: list[bytes]) -> None:
        """RejectedModel unless the accelerated ood_score is the SavedModel's within
        OOD_AGREEMENT_TOLERANCE of its size, and the flag the same wherever the SavedModel's
        score is further from the threshold than that."""
        fast = self.infer(images)
        reference = self._outputs(self._serve, images, OOD_OUTPUTS)
        want, flags = reference[OOD_SCORE_OUTPUT].reshape(-1), reference[OOD_FLAG_OUTPUT]
        assert fast.ood_score is not None and fast.in_distribution is not None  # has_ood
        allowed = OOD_AGREEMENT_TOLERANCE * np.maximum(1.0, np.abs(want))
        far = np.abs(want - self.manifest.ood.threshold) > allowed if self.manifest.ood else True
        close = fast.ood_score.shape == want.shape and bool(
            np.all(np.abs(fast.ood_score - want) <= allowed)
        )
        if not close or bool(np.any((fast.in_distribution != flags.reshape(-1)) & far)):
            raise RejectedModel(
                f"{self.name} v{self.version}: {self.runtime} disagrees with the SavedModel on "
                f"the warm-up images' ood_score ({fast.ood_score.tolist()} vs {want.tolist()}, "
                f"limit {OOD_AGREEMENT_TOLERANCE:g} of the score) or in_distribution; "
                f"{ONNX_FILE} is not this version's network: re-export it, or serve with "
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
        if self.has_ood:
            self._warm_up_ood(images)
        if self.explainable:
            self._warm_up_explain(images[:1])

    def _warm_up_ood(self, images: list[bytes]) -> None:
        """A version's OOD outputs must be one finite score and one flag per image."""
        outputs = self.infer(images)
        score, flags = outputs.ood_score, outputs.in_distribution
        expected = (len(images),)
        if score is None or flags is None or score.shape != expected or flags.shape != expected:
            raise RejectedModel(
                f"{self.name} v{self.version}: warm-up returned ood_score / in_distribution "
                f"of shapes {getattr(score, 'shape', None)} / {getattr(flags, 'shape', None)}, "
                f"expected {expected}"
            )
        if not np.isfinite(score).all():
            raise RejectedModel(f"{self.name} v{self.version}: warm-up ood_score is not finite")

    def _warm_up_explain(self, images: list[bytes]) -> None:
        """An `explain` signature must answer like graft's exports' does, or the version is
        refused: a broken one would fail the batches its requests share with others."""
        label = f"{self.name} v{self.version}: {EXPLAIN_SIGNATURE}"
        signature = self._module.signatures[EXPLAIN_SIGNATURE]
        _, inputs = signature.structured_input_signature
        missing = [key for key in EXPLAIN_OUTPUTS if key not in signature.structured_outputs]
        if set(inputs) != {"images"} or missing:
            raise RejectedModel(f"{label} must take `images` and return {list(EXPLAIN_OUTPUTS)}")
        try:
            outputs, heatmaps = self.explain(images)
        except InvalidImage as exc:
            raise RejectedModel(f"{label} fails on a warm-up image: {exc}") from exc
        probabilities, size = outputs.probabilities, self.image_size
        if probabilities.shape != (1, len(self.labels)) or heatmaps.shape != (1, size, size):
            raise RejectedModel(
                f"{label} returns shapes {probabilities.shape} and {heatmaps.shape}, expected "
                f"(1, {len(self.labels)}) and (1, {size}, {size})"
            )
        if not (np.isfinite(heatmaps).all() and heatmaps.min() >= 0 and heatmaps.max() <= 1):
            raise RejectedModel(f"{label}: the warm-up heatmap is not within [0, 1]")


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

"""The backbone registry: name -> BackboneSpec (how to build it, its size, its feature width).

Every backbone is a flat functional feature extractor: float32 RGB pixels in [0, 255]
[None, s, s, 3] -> feature map [None, h, w, feature_dim], with its own normalisation as the
first layer(s). The keras.applications networks are built with `input_tensor=` set to the
output of that normalisation layer, so their layers sit directly in `model.layers` and
"unfreeze the top N layers" is simply `model.layers[-N:]`.
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import keras

from training.backbones.layers import CaffePreprocess
from training.backbones.lite0_pretrained import efficientnet_lite0

Weights = str | Path | None
Builder = Callable[[Weights, int], keras.Model]


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    image_size: int  # native input side, what the ImageNet weights were trained at
    feature_dim: int  # channels of the output feature map
    fine_tune_layers: int  # default count of top base layers to unfreeze in phase 2
    builder: Builder = field(repr=False, compare=False)

    def build(self, weights: Weights = "imagenet", image_size: int | None = None) -> keras.Model:
        """The feature extractor. weights: "imagenet", a local weights file, or None."""
        size = image_size or self.image_size
        if size < 32:
            raise ValueError(f"image_size must be at least 32 pixels, got {size}")
        return self.builder(weights, size)


def _build_lite0(weights: Weights, size: int) -> keras.Model:
    return efficientnet_lite0(include_top=False, weights=weights, input_shape=(size, size, 3))


def _local_weights_file(weights: str | Path) -> Path:
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(
            f"weights file {path} does not exist; pass 'imagenet' (downloads once into Keras's "
            "cache), None (random init), or the path of a .weights.h5 file saved from this "
            "backbone's build()"
        )
    return path


def _keras_application(
    constructor: Callable[..., keras.Model],
    normalisation: Callable[[], keras.layers.Layer] | None,
) -> Builder:
    """A builder for a keras.applications network with our normalisation layer in front."""

    def build(weights: Weights, size: int) -> keras.Model:
        keras_weights = "imagenet" if str(weights) == "imagenet" else None
        local = _local_weights_file(weights) if weights is not None and not keras_weights else None
        inputs = keras.Input(shape=(size, size, 3), name="pixels")
        x = normalisation()(inputs) if normalisation else inputs
        try:
            base = constructor(include_top=False, weights=keras_weights, input_tensor=x)
        except Exception as exc:  # Keras raises a bare Exception when the download fails
            if keras_weights is None:
                raise
            raise RuntimeError(
                f"cannot load Keras's ImageNet weights for {constructor.__name__}: {exc}. "
                "Keras downloads them on first use; offline, use the efficientnet_lite0 "
                "backbone (its weights ship with graft) or pass a local .weights.h5 file"
            ) from exc
        # Re-wrap the same layers: some applications take their inputs as a list.
        model = keras.Model(inputs, base.output, name=base.name)
        if local is not None:
            model.load_weights(local)
        return model

    return build


def _mobilenet_v2_normalisation() -> keras.layers.Layer:
    return keras.layers.Rescaling(1.0 / 127.5, offset=-1.0, name="rescaling")  # -> [-1, 1]


def _caffe_normalisation() -> keras.layers.Layer:
    return CaffePreprocess(name="caffe_preprocess")


# fine_tune_layers are chosen so the unfrozen part starts at a block boundary: the head plus
# the last two blocks (Lite0, B0), blocks 11-16 + head (MobileNetV2, near the Keras transfer
# learning guide's cut at layer 100), or the last two residual blocks (ResNet50).
BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        BackboneSpec("efficientnet_lite0", 224, 1280, 20, _build_lite0),
        BackboneSpec(
            "mobilenet_v2",
            224,
            1280,
            56,
            _keras_application(keras.applications.MobileNetV2, _mobilenet_v2_normalisation),
        ),
        # Keras's EfficientNetB0 already normalises [0, 255] pixels inside the model.
        BackboneSpec(
            "efficientnet_b0",
            224,
            1280,
            31,
            _keras_application(keras.applications.EfficientNetB0, None),
        ),
        BackboneSpec(
            "resnet50",
            224,
            2048,
            20,
            _keras_application(keras.applications.ResNet50, _caffe_normalisation),
        ),
    )
}


def get_backbone(name: str) -> BackboneSpec:
    """The spec for `name`; ValueError naming the valid choices otherwise."""
    try:
        return BACKBONES[name]
    except KeyError:
        valid = ", ".join(sorted(BACKBONES))
        raise ValueError(f"unknown backbone {name!r}; choose one of: {valid}") from None

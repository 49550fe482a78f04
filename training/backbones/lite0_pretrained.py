"""`efficientnet_lite0(...)`: the public builder, in the shape of keras.applications: the
architecture (`lite0_architecture`) with its ImageNet weights (converted by `lite0_conversion`)
or a weights file loaded, and the top optionally cut off."""

from pathlib import Path

import keras

from training.backbones.lite0_architecture import build_efficientnet_lite0
from training.backbones.lite0_conversion import load_converted_checkpoint, packaged_checkpoint

_POOLING = {"avg": keras.layers.GlobalAveragePooling2D, "max": keras.layers.GlobalMaxPooling2D}


def _weights_file(weights: str | Path) -> Path:
    """The file to load weights from: the packaged checkpoint for "imagenet", else `weights`."""
    if str(weights) == "imagenet":
        return packaged_checkpoint()
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(
            f"weights file {path} does not exist; pass 'imagenet', None, a .weights.h5 file "
            "saved from efficientnet_lite0(include_top=True), or a legacy PyTorch .pth checkpoint"
        )
    return path


def _load_weights(model: keras.Model, path: Path) -> None:
    if path.name.endswith(".weights.h5"):
        model.load_weights(path)
    else:  # a legacy PyTorch checkpoint: converted once, then loaded from the cache
        load_converted_checkpoint(model, path)


def efficientnet_lite0(
    include_top: bool = True,
    weights: str | Path | None = "imagenet",
    input_shape: tuple[int, int, int] | None = None,
    pooling: str | None = None,
) -> keras.Model:
    """EfficientNet-Lite0: float32 RGB pixels in [0, 255] -> 1000 ImageNet softmax scores.

    weights: "imagenet" (offline: converted once from the packaged checkpoint, then cached),
    None (random init), or a path to a `.weights.h5` / legacy `.pth` file of the full model.
    include_top=False returns the feature extractor: the [h, w, 1280] map, or a 1280 vector
    with pooling="avg" | "max". pooling is ignored when include_top is True (as in Keras).
    """
    shape = tuple(input_shape or (224, 224, 3))
    if len(shape) != 3 or shape[2] != 3 or min(shape[:2]) < 32:
        raise ValueError(f"input_shape must be (height, width, 3) with sides >= 32, got {shape}")
    if pooling not in (None, *_POOLING):
        raise ValueError(f"pooling must be None, 'avg' or 'max', got {pooling!r}")
    weights_file = None if weights is None else _weights_file(weights)  # before the slow build
    model = build_efficientnet_lite0(shape)
    if weights_file is not None:
        _load_weights(model, weights_file)
    if include_top:
        return model
    features = model.get_layer("top_activation").output
    if pooling is not None:
        features = _POOLING[pooling](name=f"{pooling}_pool")(features)
    return keras.Model(model.input, features, name="efficientnet_lite0")

"""The classifier: pretrained backbone -> global average pooling -> dropout -> [Dense] -> softmax.

The head layers exist once and are wired into two graphs: `model` (pixels -> probabilities,
the one that is fine-tuned and exported) and `head` (pooled features -> probabilities, the one
phase 1 trains on cached features). Training `head` therefore trains `model`'s head in place.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras


@dataclass
class Classifier:
    model: keras.Model  # float32 [n, s, s, 3] pixels in [0, 255] -> probabilities [n, C]
    base: keras.Model  # the backbone, called with training=False (BatchNorm in inference mode)
    features: keras.Model  # pixels -> pooled backbone features [n, D] (shares base + pool)
    head: keras.Model  # pooled features [n, D] -> probabilities (shares the head layers)
    pool: keras.layers.Layer  # feature map -> [n, D]
    image_size: int
    backbone: str


def build_classifier(
    base: keras.Model,
    num_classes: int,
    *,
    image_size: int,
    backbone: str,
    dropout: float = 0.2,
    hidden_units: int = 0,
    seed: int = 0,
) -> Classifier:
    """Wire `base` (pixels -> feature map) into the classifier graphs, base frozen."""
    base.trainable = False
    pool = keras.layers.GlobalAveragePooling2D(name="pool")
    head_layers: list[keras.layers.Layer] = [
        keras.layers.Dropout(dropout, seed=seed, name="dropout")
    ]
    if hidden_units > 0:
        head_layers.append(
            keras.layers.Dense(
                hidden_units,
                activation="relu",
                kernel_initializer=keras.initializers.GlorotUniform(seed=seed + 1),
                name="hidden",
            )
        )
    head_layers.append(
        keras.layers.Dense(
            num_classes,
            activation="softmax",
            kernel_initializer=keras.initializers.GlorotUniform(seed=seed),
            name="probabilities",
            dtype="float32",  # softmax and the loss in float32 under mixed precision too
        )
    )

    def apply_head(x: keras.KerasTensor) -> keras.KerasTensor:
        for layer in head_layers:
            x = layer(x)
        return x

    pixels = keras.Input((image_size, image_size, 3), name="pixels")
    # training=False keeps BatchNorm statistics frozen in BOTH phases, so the frozen part's
    # output is a pure function of the image and can be cached.
    pooled = pool(base(pixels, training=False))
    model = keras.Model(pixels, apply_head(pooled), name="graft_classifier")
    features = keras.Model(pixels, pooled, name="graft_features")
    feature_in = keras.Input((pooled.shape[-1],), name="features")
    head = keras.Model(feature_in, apply_head(feature_in), name="graft_head")
    return Classifier(model, base, features, head, pool, image_size, backbone)


def unfreeze_top(base: keras.Model, layers: int) -> int:
    """Make the top `layers` layers of `base` trainable, except BatchNormalization layers, which
    stay frozen (small datasets wreck their statistics and scale/offset). Returns the number of
    trainable weights tensors, 0 when nothing was unfrozen."""
    base.trainable = True
    cut = max(len(base.layers) - layers, 0) if layers > 0 else len(base.layers)
    for index, layer in enumerate(base.layers):
        layer.trainable = index >= cut and not isinstance(layer, keras.layers.BatchNormalization)
    return len(base.trainable_weights)


def cut_base(base: keras.Model, layers: int) -> tuple[keras.Model, keras.Model] | None:
    """Split `base` before its top `layers` layers into (trunk, top), sharing the layer objects:
    trunk(pixels) -> the activation entering the top part, top(that) == base(pixels).

    None when the top part reads more than one tensor from below (a skip connection crossing
    the cut) or when there is nothing below it."""
    cut = len(base.layers) - layers
    if layers <= 0 or cut <= 1:
        return None
    below = {id(layer) for layer in base.layers[:cut]}
    crossing: list[keras.KerasTensor] = []
    for layer in base.layers[cut:]:
        for node in layer._inbound_nodes:
            for tensor in keras.tree.flatten(node.input_tensors):
                source = tensor._keras_history[0]
                if id(source) in below and not any(tensor is seen for seen in crossing):
                    crossing.append(tensor)
    if len(crossing) != 1:
        return None
    trunk = keras.Model(base.inputs, crossing[0], name=f"{base.name}_trunk")
    top = keras.Model(crossing[0], base.output, name=f"{base.name}_top")
    return trunk, top

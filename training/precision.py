"""`graft train --mixed-precision`: float16 compute while training, a float32 model to export.

Keras' `mixed_float16` policy computes in float16 and keeps the variables in float32, which
is what makes a GPU's tensor cores pay; on a CPU it is slower. The classifier's last layer
(softmax) stays float32 for a stable loss. What is exported is a float32 copy with the same
weights: serving, ONNX Runtime's CPU kernels and the agreement check all want float32, and a
float16 network would give numbers no float32 runtime reproduces within 1e-4.
"""

from collections.abc import Iterator
from contextlib import contextmanager

import keras

MIXED = "mixed_float16"


@contextmanager
def mixed_precision(enabled: bool) -> Iterator[None]:
    """Build and train under `mixed_float16` when `enabled`; the old policy after."""
    previous = keras.mixed_precision.global_policy()
    if enabled:
        keras.mixed_precision.set_global_policy(MIXED)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def float32_copy(model: keras.Model) -> keras.Model:
    """`model` rebuilt with every layer in float32, holding the same weights (a no-op copy
    is skipped: a float32 model is returned as it is)."""
    if all(layer.dtype_policy.name == "float32" for layer in model._flatten_layers()):
        return model

    def in_float32(layer: keras.layers.Layer) -> keras.layers.Layer:
        return layer.__class__.from_config({**layer.get_config(), "dtype": "float32"})

    copy = keras.models.clone_model(model, clone_function=in_float32, recursive=True)
    copy.set_weights(model.get_weights())
    return copy

"""The network as ONNX: what an accelerated runtime (ONNX Runtime, OpenVINO) serves.

Only the network is converted (float32 pixels [n, s, s, 3] in [0, 255] -> its output): decoding
and resizing stay in the SavedModel's `preprocess` signature, the one function training uses,
so serving never carries a second implementation of them.
"""

from pathlib import Path

import keras
import tensorflow as tf

from service.store.layout import ONNX_INPUT, ONNX_OUTPUT
from service.store.manifest import Accelerated, sha256_file
from training.ood import named_outputs

ONNX_OPSET = 17  # ONNX Runtime 1.17+ and OpenVINO 2023+ run it; tf2onnx 1.17 converts it


def network_to_onnx(model: keras.Model, image_size: int, output: str) -> bytes:
    """`model` (pixels [n, s, s, 3] -> one float32 tensor) as a serialised ONNX model, with
    input `pixels` and output `output`, any batch size. A `training.ood.with_ood` model keeps
    its `ood_score` and `in_distribution` outputs beside it."""
    import tf2onnx  # training only: serving never converts

    @tf.function(
        input_signature=[tf.TensorSpec([None, image_size, image_size, 3], tf.float32, ONNX_INPUT)]
    )
    def network(pixels: tf.Tensor) -> dict[str, tf.Tensor]:
        named = named_outputs(model(pixels, training=False))
        main = tf.cast(named.pop(ONNX_OUTPUT), tf.float32)
        return {output: main, **named}

    proto, _ = tf2onnx.convert.from_function(
        network, input_signature=network.input_signature, opset=ONNX_OPSET
    )
    return proto.SerializeToString()


def write_onnx(model: keras.Model, image_size: int, output: str, path: Path) -> Accelerated:
    """Convert `model` into `path`; what graft.json records of it."""
    import tf2onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(network_to_onnx(model, image_size, output))
    return Accelerated(
        sha256=sha256_file(path), converter=f"tf2onnx {tf2onnx.__version__}", opset=ONNX_OPSET
    )

"""The one resize: uint8 pixels are resized as they are, never copied to float32 at full size,
with exactly the numbers of casting first (what every model so far was trained and served on).
"""

import numpy as np
import pytest
import tensorflow as tf

from training.preprocess import decode_and_resize, resize_pixels


def cast_first(pixels: tf.Tensor, size: int) -> tf.Tensor:
    """resize_pixels as it was: float32 at full size, then the resize."""
    resized = tf.image.resize(
        tf.cast(pixels, tf.float32), [size, size], method="bilinear", antialias=True
    )
    return tf.clip_by_value(resized, 0.0, 255.0)


@pytest.mark.parametrize(
    ("shape", "size"),
    [
        ((480, 640, 3), 224),  # shrink
        ((17, 1000, 3), 224),  # a strip: shrink one way, stretch the other
        ((100, 100, 3), 224),  # stretch
        ((224, 224, 3), 224),  # same size
        ((3, 5, 3), 32),
        ((2, 300, 200, 3), 96),  # a batch, as serve_pixels gets it
        ((3000, 4000, 3), 224),  # a 12 MP photo
    ],
)
def test_uint8_pixels_give_exactly_the_numbers_of_casting_first(
    shape: tuple[int, ...], size: int
) -> None:
    pixels = tf.constant(np.random.default_rng(sum(shape)).integers(0, 256, shape, np.uint8))
    resized = resize_pixels(pixels, size)
    assert resized.dtype == tf.float32
    np.testing.assert_array_equal(resized.numpy(), cast_first(pixels, size).numpy())


def test_float_pixels_are_resized_as_before() -> None:
    pixels = tf.constant(np.random.default_rng(1).uniform(-20, 300, (64, 48, 3)), tf.float32)
    np.testing.assert_array_equal(resize_pixels(pixels, 32).numpy(), cast_first(pixels, 32).numpy())
    doubles = tf.cast(pixels, tf.float64)  # other dtypes are cast to float32 first, as before
    np.testing.assert_array_equal(
        resize_pixels(doubles, 32).numpy(), cast_first(doubles, 32).numpy()
    )


def test_the_serving_graph_never_casts_the_full_size_image() -> None:
    """In the graph that serving_default and preprocess run, the decoded uint8 image goes
    straight into the resize: no Cast of it, so no float32 copy at full size."""

    @tf.function(input_signature=[tf.TensorSpec([], tf.string)])
    def one(encoded: tf.Tensor) -> tf.Tensor:
        return decode_and_resize(encoded, 32)

    graph = one.get_concrete_function().graph
    decode = next(op for op in graph.get_operations() if op.type == "DecodeImage")
    image = decode.outputs[0]
    # set_shape and the batch axis the resize adds are views of the same buffer, not copies
    while len(image.consumers()) == 1 and image.consumers()[0].type in ("Identity", "ExpandDims"):
        image = image.consumers()[0].outputs[0]
    readers = sorted(op.type for op in image.consumers())
    assert "ScaleAndTranslate" in readers and "Cast" not in readers, readers

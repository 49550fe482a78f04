"""The one image decode + resize used by training AND by the exported serving signature.

Training's tf.data pipeline and the SavedModel's `serving_default` both call
`decode_and_resize`, so the pixels a model sees in production are exactly the pixels it was
trained on. Backbone-specific normalisation is NOT done here: it is a layer inside each
backbone, so the Keras model always takes RGB float pixels in [0, 255].
"""

import tensorflow as tf


def decode_rgb(encoded: tf.Tensor) -> tf.Tensor:
    """Encoded JPEG / PNG / BMP / GIF (first frame) bytes -> uint8 RGB [h, w, 3].

    `channels=3` folds grayscale, palette and RGBA images into RGB (alpha is dropped);
    16-bit PNGs are scaled to 8 bits.
    """
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False, dtype=tf.uint8)
    image.set_shape([None, None, 3])
    return image


def resize_pixels(pixels: tf.Tensor, image_size: int) -> tf.Tensor:
    """uint8 or float RGB pixels, [h, w, 3] or [n, h, w, 3] -> float32 in [0, 255] at
    `image_size` x `image_size`.

    Bilinear with antialiasing, so large phone photos shrink without aliasing; the aspect
    ratio is not kept (the same squash `keras.utils.image_dataset_from_directory` does).

    uint8 pixels go into the resize as they are, not cast to float32 first: the resize kernel
    (ScaleAndTranslate) reads each value as a float itself, so the result is bit-identical,
    and the full-size image is never copied at 4 bytes a value (a 40 MP photo: 480 MB).
    """
    if pixels.dtype not in (tf.uint8, tf.float32):
        pixels = tf.cast(pixels, tf.float32)
    resized = tf.image.resize(pixels, [image_size, image_size], method="bilinear", antialias=True)
    return tf.clip_by_value(resized, 0.0, 255.0)


def decode_and_resize(encoded: tf.Tensor, image_size: int) -> tf.Tensor:
    """Encoded image bytes -> float32 [image_size, image_size, 3] in [0, 255]."""
    return resize_pixels(decode_rgb(encoded), image_size)


def decode_batch(encoded: tf.Tensor, image_size: int) -> tf.Tensor:
    """A [n] string tensor of encoded images -> float32 [n, image_size, image_size, 3]."""
    return tf.map_fn(
        lambda one: decode_and_resize(one, image_size),
        encoded,
        fn_output_signature=tf.TensorSpec([image_size, image_size, 3], tf.float32),
    )

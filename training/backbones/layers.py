"""Small registered preprocessing layers, so saved and exported models need no Lambda layer."""

import keras
from keras import ops

# The per-channel ImageNet means, in BGR order, that caffe-style weights (ResNet50) expect.
CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)


@keras.saving.register_keras_serializable(package="graft")
class CaffePreprocess(keras.layers.Layer):
    """RGB pixels in [0, 255] -> BGR with the ImageNet mean subtracted (no scaling).

    The same arithmetic as keras.applications.resnet50.preprocess_input, as a layer.
    """

    def call(self, inputs: keras.KerasTensor) -> keras.KerasTensor:
        bgr = ops.flip(inputs, axis=-1)
        return bgr - ops.convert_to_tensor(CAFFE_BGR_MEAN, dtype=self.compute_dtype)

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        return input_shape

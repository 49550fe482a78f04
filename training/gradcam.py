"""Grad-CAM (Selvaraju et al., 2017) of an exported classifier, as a graph the export bakes in.

The heatmap says where in the image the top-1 class came from: the gradient of that class's
logit with respect to the backbone's last convolutional feature map, averaged over the map to
weigh each channel, then the weighted sum of the channels, ReLU, upsampled to the model's image
size and scaled so that each image's peak is 1.

Every model graft exports is pixels -> backbone -> global pooling -> head -> softmax, in one of
two shapes: a trained classifier (training.model, the backbone one nested layer, maybe with
the calibration temperature after the softmax) or the flat ImageNet default (Lite0 with its
top). Both are cut the same way: the feature map is the last 4-D activation before the head
flattens it (the backbone's output: top_activation for the EfficientNets, out_relu for
MobileNetV2, conv5_block3_out for ResNet50), and the logits are the input of the last softmax
Dense times its kernel plus its bias (the temperature only divides them, which changes no map
once it is scaled to its peak). The gradient is taken with the map watched, so only the head's
small backward graph is exported, none of the backbone's.
"""

from dataclasses import dataclass
from typing import Any

import keras
import tensorflow as tf

_FLOOR = 1e-12  # log(0) guard of the fallback target (a model without a softmax Dense)


@dataclass(frozen=True)
class GradCam:
    """`model` cut at its last convolutional feature map."""

    features: keras.Model  # pixels -> the feature map [n, h, w, k]
    head: keras.Model  # feature map -> [the softmax Dense's input (if any), *model outputs]
    logits: keras.layers.Dense | None  # the softmax Dense, whose pre-activation is the logits
    layer: str  # the layer whose output is the feature map, for messages and the manifest

    @classmethod
    def of(cls, model: keras.Model) -> "GradCam":
        """Cut `model` (pixels -> probabilities); ValueError when it has no 4-D activation."""
        graph = keras.Model(model.inputs, model.outputs)  # Sequential too: one functional graph
        dense, dense_input = _softmax_dense(graph)
        node = _last_feature_map(graph)
        if node is None:
            raise ValueError(f"{model.name} has no 4-D activation to explain")
        feature_map = node.output_tensors[0]
        outputs = [dense_input, *graph.outputs] if dense is not None else list(graph.outputs)
        return cls(
            features=keras.Model(graph.inputs, feature_map, name="gradcam_features"),
            head=keras.Model(feature_map, outputs, name="gradcam_head"),
            logits=dense,
            layer=node.operation.name,
        )

    def __call__(self, pixels: tf.Tensor, image_size: int) -> tuple[Any, tf.Tensor]:
        """float32 pixels [n, s, s, 3] -> (the model's outputs, as `model(pixels)` returns
        them: probabilities [n, C] first; the heatmap [n, s, s] in [0, 1])."""
        feature_map = tf.cast(self.features(pixels, training=False), tf.float32)
        with tf.GradientTape() as tape:
            tape.watch(feature_map)
            model_outputs, target = self._target(feature_map)
        # Images do not mix in the head (BatchNorm and Dropout in inference mode), so the
        # gradient of the batch's sum is each image's own gradient.
        gradients = tape.gradient(target, feature_map)
        weights = tf.reduce_mean(gradients, axis=[1, 2], keepdims=True)  # [n, 1, 1, k]
        cam = tf.nn.relu(tf.reduce_sum(weights * feature_map, axis=-1, keepdims=True))
        cam = tf.image.resize(cam, [image_size, image_size], method="bilinear")[..., 0]
        peak = tf.reduce_max(cam, axis=[1, 2], keepdims=True)
        heatmap = tf.clip_by_value(tf.math.divide_no_nan(cam, peak), 0.0, 1.0)
        return model_outputs, heatmap

    def _target(self, feature_map: tf.Tensor) -> tuple[Any, tf.Tensor]:
        """(the model's outputs, the sum over the batch of each image's top-1 logit)."""
        outputs = self.head(feature_map, training=False)
        outputs = list(outputs) if isinstance(outputs, list | tuple) else [outputs]
        if self.logits is not None:
            dense_input, outputs = tf.cast(outputs[0], tf.float32), outputs[1:]
        model_outputs = outputs[0] if len(outputs) == 1 else outputs
        probabilities = tf.cast(outputs[0], tf.float32)
        if self.logits is None:
            scores = tf.math.log(tf.maximum(probabilities, _FLOOR))
        else:
            kernel = tf.cast(self.logits.kernel, tf.float32)
            scores = tf.matmul(dense_input, kernel)
            if self.logits.use_bias:
                scores += tf.cast(self.logits.bias, tf.float32)
        top = tf.argmax(probabilities, axis=-1, output_type=tf.int32)
        return model_outputs, tf.reduce_sum(tf.gather(scores, top, axis=1, batch_dims=1))


def _nodes_from_output(graph: keras.Model) -> list[Any]:
    """The graph's call nodes, from the output back towards the input (depth 0 is the output)."""
    by_depth = graph._nodes_by_depth
    return [node for depth in sorted(by_depth) for node in by_depth[depth]]


def _softmax_dense(graph: keras.Model) -> tuple[keras.layers.Dense | None, Any]:
    """The last Dense layer that ends in a softmax, and its input tensor; (None, None) if the
    model has none (its probabilities then come from elsewhere: the log-probability is used)."""
    for node in _nodes_from_output(graph):
        layer = node.operation
        if isinstance(layer, keras.layers.Dense) and _is_softmax(layer.activation):
            return layer, node.input_tensors[0]
        if len(node.output_tensors) == 1 and len(node.output_tensors[0].shape) == 4:
            break  # past the head, into the feature maps
    return None, None


def _last_feature_map(graph: keras.Model) -> Any:
    """The node nearest the output whose one output is 4-D: the backbone's last block."""
    for node in _nodes_from_output(graph):
        outputs = node.output_tensors
        if len(outputs) == 1 and len(outputs[0].shape) == 4:
            return node
    return None


def _is_softmax(activation: Any) -> bool:
    return getattr(activation, "__name__", "") == "softmax"

"""EfficientNet-Lite0 in Keras 3, laid out like keras/src/applications/efficientnet.py.

Lite differs from EfficientNet-B0 in what makes it quantisation- and CPU-friendly: no
squeeze-and-excitation, ReLU6 instead of swish, and a fixed stem (32) and head (1280). Padding
is TensorFlow "same" (asymmetric for stride 2), which is what the published weights were
trained with (lukemelas' PyTorch port emulates it with Conv2dStaticSamePadding).

The model takes RGB float pixels in [0, 255]; its first layer normalises them to
(x - 127) / 128, the normalisation the Lite checkpoints were trained with.
"""

from collections.abc import Iterator
from dataclasses import dataclass

import keras
from keras import layers

BN_EPSILON = 1e-3
STEM_FILTERS = 32
HEAD_FILTERS = 1280
NUM_CLASSES = 1000
DROPOUT_RATE = 0.2


@dataclass(frozen=True)
class BlockArgs:
    expand_ratio: int
    kernel_size: int
    strides: int
    filters_in: int
    filters_out: int
    repeats: int


BLOCKS_ARGS: tuple[BlockArgs, ...] = (
    BlockArgs(1, 3, 1, 32, 16, 1),
    BlockArgs(6, 3, 2, 16, 24, 2),
    BlockArgs(6, 5, 2, 24, 40, 2),
    BlockArgs(6, 3, 2, 40, 80, 3),
    BlockArgs(6, 5, 1, 80, 112, 3),
    BlockArgs(6, 5, 2, 112, 192, 4),
    BlockArgs(6, 3, 1, 192, 320, 1),
)


@dataclass(frozen=True)
class Block:
    """One MBConv block as built: its Keras name prefix and its (already repeated) shape."""

    prefix: str  # "block2b_"
    index: int  # position in the flat block list (lukemelas' `_blocks.N`)
    expand_ratio: int
    kernel_size: int
    strides: int
    filters_in: int
    filters_out: int


def blocks() -> Iterator[Block]:
    """Every block in order; repeats after the first take stride 1 and in == out."""
    index = 0
    for stage, args in enumerate(BLOCKS_ARGS, start=1):
        for repeat in range(args.repeats):
            yield Block(
                prefix=f"block{stage}{chr(ord('a') + repeat)}_",
                index=index,
                expand_ratio=args.expand_ratio,
                kernel_size=args.kernel_size,
                strides=args.strides if repeat == 0 else 1,
                filters_in=args.filters_in if repeat == 0 else args.filters_out,
                filters_out=args.filters_out,
            )
            index += 1


def _conv_bn_act(
    x: keras.KerasTensor, filters: int, kernel: int, strides: int, name: str
) -> keras.KerasTensor:
    x = layers.Conv2D(
        filters, kernel, strides=strides, padding="same", use_bias=False, name=f"{name}_conv"
    )(x)
    x = layers.BatchNormalization(epsilon=BN_EPSILON, name=f"{name}_bn")(x)
    return layers.ReLU(6.0, name=f"{name}_activation")(x)


def mbconv_block(x: keras.KerasTensor, block: Block) -> keras.KerasTensor:
    """Inverted residual: 1x1 expand -> depthwise -> 1x1 linear projection (+ skip)."""
    p = block.prefix
    inputs = x
    if block.expand_ratio != 1:
        x = _conv_bn_act(x, block.filters_in * block.expand_ratio, 1, 1, f"{p}expand")
    x = layers.DepthwiseConv2D(
        block.kernel_size, strides=block.strides, padding="same", use_bias=False, name=f"{p}dwconv"
    )(x)
    x = layers.BatchNormalization(epsilon=BN_EPSILON, name=f"{p}bn")(x)
    x = layers.ReLU(6.0, name=f"{p}activation")(x)
    x = layers.Conv2D(
        block.filters_out, 1, padding="same", use_bias=False, name=f"{p}project_conv"
    )(x)
    x = layers.BatchNormalization(epsilon=BN_EPSILON, name=f"{p}project_bn")(x)
    if block.strides == 1 and block.filters_in == block.filters_out:
        x = layers.Add(name=f"{p}add")([x, inputs])
    return x


def build_efficientnet_lite0(input_shape: tuple[int, int, int] = (224, 224, 3)) -> keras.Model:
    """The full classifier, randomly initialised: pixels [0, 255] -> 1000 softmax scores.

    Layer names follow keras.applications.EfficientNetB0 (stem_conv, block1a_dwconv, ...,
    top_activation, predictions), so `get_layer("top_activation")` is the feature map.
    """
    inputs = keras.Input(shape=input_shape, name="pixels")
    x = layers.Rescaling(1.0 / 128.0, offset=-127.0 / 128.0, name="rescaling")(inputs)
    x = _conv_bn_act(x, STEM_FILTERS, 3, 2, "stem")
    for block in blocks():
        x = mbconv_block(x, block)
    x = _conv_bn_act(x, HEAD_FILTERS, 1, 1, "top")
    x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    x = layers.Dropout(DROPOUT_RATE, name="top_dropout")(x)
    outputs = layers.Dense(NUM_CLASSES, activation="softmax", name="predictions")(x)
    return keras.Model(inputs, outputs, name="efficientnet_lite0")

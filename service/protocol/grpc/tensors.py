"""TensorFlow Serving's protobufs <-> graft's plain values: tensors, shapes, tf.Examples.

No TensorFlow: the messages come from graft's own stubs of TF Serving's protos.
"""

from collections.abc import Callable, Sequence

import numpy as np
from google.protobuf import json_format

from service.errors import BadRequest
from service.gateway.pixels import pixel_images as pngs
from service.stubs.tensorflow.core.example import example_pb2
from service.stubs.tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
from service.stubs.tensorflow_serving.apis import classification_pb2, get_model_metadata_pb2

IMAGE_FEATURE = "image/encoded"


def _dims(tensor: tensor_pb2.TensorProto) -> list[int]:
    return [dim.size for dim in tensor.tensor_shape.dim]


CountCheck = Callable[[int], None]  # refuses a request of that many images (Gateway's limit)
PixelCheck = Callable[[int, int, int], None]  # refuses n images of h x w (Gateway's limits)


def encoded_images(tensor: tensor_pb2.TensorProto, check_count: CountCheck) -> list[bytes]:
    shape = _dims(tensor)
    if tensor.dtype != types_pb2.DT_STRING or len(shape) != 1:
        raise BadRequest(
            f"input `images` must be a DT_STRING tensor of shape [n] holding encoded images, "
            f"got {types_pb2.DataType.Name(tensor.dtype)} {shape}; build it with "
            "tf.make_tensor_proto([jpeg_bytes, ...])"
        )
    check_count(shape[0])
    if shape[0] != len(tensor.string_val):
        raise BadRequest(f"input `images` has shape {shape} but {len(tensor.string_val)} values")
    return list(tensor.string_val)


def pixel_images(tensor: tensor_pb2.TensorProto, check_shape: PixelCheck) -> list[bytes]:
    """uint8 [n, h, w, 3] pixels -> lossless PNGs, so pixels share the encoded-image path.
    Counts and sizes are checked from the shape before any pixel is touched."""
    shape = _dims(tensor)
    if tensor.dtype != types_pb2.DT_UINT8 or len(shape) != 4 or shape[3] != 3:
        raise BadRequest(
            f"input `pixels` must be a DT_UINT8 tensor of shape [n, h, w, 3], got "
            f"{types_pb2.DataType.Name(tensor.dtype)} {shape}"
        )
    check_shape(shape[0], shape[1], shape[2])
    if tensor.tensor_content:
        flat = np.frombuffer(tensor.tensor_content, dtype=np.uint8)
    else:
        flat = np.asarray(tensor.int_val, dtype=np.uint8)
    if flat.size != int(np.prod(shape)):
        raise BadRequest(f"input `pixels` has shape {shape} but {flat.size} values")
    return pngs(flat.reshape(shape))


def float_tensor(values: np.ndarray) -> tensor_pb2.TensorProto:
    return tensor_pb2.TensorProto(
        dtype=types_pb2.DT_FLOAT,
        tensor_shape=_shape_proto(values.shape),
        tensor_content=np.ascontiguousarray(values, dtype="<f4").tobytes(),
    )


def bool_tensor(values: Sequence[bool]) -> tensor_pb2.TensorProto:
    return tensor_pb2.TensorProto(
        dtype=types_pb2.DT_BOOL, tensor_shape=_shape_proto((len(values),)), bool_val=values
    )


def string_tensor(values: Sequence[str]) -> tensor_pb2.TensorProto:
    return tensor_pb2.TensorProto(
        dtype=types_pb2.DT_STRING,
        tensor_shape=_shape_proto((len(values),)),
        string_val=[value.encode() for value in values],
    )


def _shape_proto(shape: Sequence[int]) -> tensor_shape_pb2.TensorShapeProto:
    dims = [tensor_shape_pb2.TensorShapeProto.Dim(size=size) for size in shape]
    return tensor_shape_pb2.TensorShapeProto(dim=dims)


def _example_image(example: example_pb2.Example, context: example_pb2.Example) -> bytes:
    for source in (example, context):
        feature = source.features.feature.get(IMAGE_FEATURE)
        if feature is not None and len(feature.bytes_list.value) == 1:
            return feature.bytes_list.value[0]
    raise BadRequest(
        f"every tf.Example needs a bytes feature {IMAGE_FEATURE!r} holding one encoded image"
    )


def examples(
    request: classification_pb2.ClassificationRequest, check_count: CountCheck
) -> list[bytes]:
    kind = request.input.WhichOneof("kind")
    if kind == "example_list":
        examples, context = request.input.example_list.examples, example_pb2.Example()
    elif kind == "example_list_with_context":
        source = request.input.example_list_with_context
        examples, context = source.examples, source.context
    else:
        raise BadRequest("ClassificationRequest.input holds no examples")
    check_count(len(examples))  # before a context image is copied into every example
    return [_example_image(example, context) for example in examples]


def signature_def_map(signatures: dict) -> get_model_metadata_pb2.SignatureDefMap:
    """TF Serving's JSON signature_def shape (LoadedModel.signatures) -> SignatureDefMap."""
    return json_format.ParseDict(
        {"signature_def": signatures}, get_model_metadata_pb2.SignatureDefMap()
    )

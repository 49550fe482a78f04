"""tensorflow.serving.PredictionService on top of the shared Gateway.

Clients that already use TensorFlow Serving's stock `PredictionServiceStub` point it at graft
unchanged: `Predict` (signature `serving_default` takes `images`, a DT_STRING [n] tensor of
encoded images; `serve_pixels` takes `pixels`, DT_UINT8 [n, h, w, 3]), `GetModelMetadata`
(signature_def) and `Classify` (tf.Example inputs whose `image/encoded` feature holds the
bytes). Everything runs through the Gateway, so it shares batches, limits and metrics with HTTP.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import TYPE_CHECKING

import grpc
import numpy as np
from google.protobuf import json_format, wrappers_pb2
from PIL import Image
from tensorflow.core.example import example_pb2
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    model_pb2,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from service.errors import BadRequest
from service.grpc_common import PROTOCOL, deadline_of, guarded, rejecting

if TYPE_CHECKING:
    from service.gateway import Gateway, Prediction

SERVING_SIGNATURE = "serving_default"
PIXELS_SIGNATURE = "serve_pixels"
# Signature -> the one input tensor it takes.
SIGNATURE_INPUTS = {SERVING_SIGNATURE: "images", PIXELS_SIGNATURE: "pixels"}
OUTPUTS = ("probabilities", "label", "score")
IMAGE_FEATURE = "image/encoded"
SIGNATURE_DEF_FIELD = "signature_def"
# Metric route labels: the gRPC method paths.
PREDICT_ROUTE = "/tensorflow.serving.PredictionService/Predict"
CLASSIFY_ROUTE = "/tensorflow.serving.PredictionService/Classify"
METADATA_ROUTE = "/tensorflow.serving.PredictionService/GetModelMetadata"


def _version(spec: model_pb2.ModelSpec) -> int | None:
    if spec.version_label:
        raise BadRequest(
            f"model_spec.version_label {spec.version_label!r} is not supported: graft versions "
            "are integers; set model_spec.version instead"
        )
    return spec.version.value if spec.HasField("version") else None


def _signature(spec: model_pb2.ModelSpec) -> str:
    name = spec.signature_name or SERVING_SIGNATURE
    if name not in SIGNATURE_INPUTS:
        raise BadRequest(
            f"unknown signature_name {name!r}; graft models have {sorted(SIGNATURE_INPUTS)}"
        )
    return name


def _shape(tensor: tensor_pb2.TensorProto) -> list[int]:
    return [dim.size for dim in tensor.tensor_shape.dim]


def _encoded_images(tensor: tensor_pb2.TensorProto) -> list[bytes]:
    shape = _shape(tensor)
    if tensor.dtype != types_pb2.DT_STRING or len(shape) != 1:
        raise BadRequest(
            f"input `images` must be a DT_STRING tensor of shape [n] holding encoded images, "
            f"got {types_pb2.DataType.Name(tensor.dtype)} {shape}; build it with "
            "tf.make_tensor_proto([jpeg_bytes, ...])"
        )
    if shape[0] != len(tensor.string_val):
        raise BadRequest(f"input `images` has shape {shape} but {len(tensor.string_val)} values")
    return list(tensor.string_val)


def _pixel_images(tensor: tensor_pb2.TensorProto) -> list[bytes]:
    """uint8 [n, h, w, 3] pixels -> lossless PNGs, so pixels share the encoded-image path."""
    shape = _shape(tensor)
    if tensor.dtype != types_pb2.DT_UINT8 or len(shape) != 4 or shape[3] != 3:
        raise BadRequest(
            f"input `pixels` must be a DT_UINT8 tensor of shape [n, h, w, 3], got "
            f"{types_pb2.DataType.Name(tensor.dtype)} {shape}"
        )
    if tensor.tensor_content:
        flat = np.frombuffer(tensor.tensor_content, dtype=np.uint8)
    else:
        flat = np.asarray(tensor.int_val, dtype=np.uint8)
    if flat.size != int(np.prod(shape)):
        raise BadRequest(f"input `pixels` has shape {shape} but {flat.size} values")
    return [_png(image) for image in flat.reshape(shape)]


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _inputs(request: predict_pb2.PredictRequest, signature: str) -> list[bytes]:
    wanted = SIGNATURE_INPUTS[signature]
    if set(request.inputs) != {wanted}:
        raise BadRequest(
            f"signature {signature!r} takes exactly one input, {wanted!r}; "
            f"got {sorted(request.inputs)}"
        )
    tensor = request.inputs[wanted]
    return _encoded_images(tensor) if signature == SERVING_SIGNATURE else _pixel_images(tensor)


def _output_names(output_filter: Sequence[str]) -> list[str]:
    unknown = sorted(set(output_filter) - set(OUTPUTS))
    if unknown:
        raise BadRequest(f"output_filter names unknown outputs {unknown}; outputs are {OUTPUTS}")
    return [name for name in OUTPUTS if not output_filter or name in output_filter]


def _float_tensor(values: np.ndarray) -> tensor_pb2.TensorProto:
    return tensor_pb2.TensorProto(
        dtype=types_pb2.DT_FLOAT,
        tensor_shape=_shape_proto(values.shape),
        tensor_content=np.ascontiguousarray(values, dtype="<f4").tobytes(),
    )


def _string_tensor(values: Sequence[str]) -> tensor_pb2.TensorProto:
    return tensor_pb2.TensorProto(
        dtype=types_pb2.DT_STRING,
        tensor_shape=_shape_proto((len(values),)),
        string_val=[value.encode() for value in values],
    )


def _shape_proto(shape: Sequence[int]) -> tensor_shape_pb2.TensorShapeProto:
    dims = [tensor_shape_pb2.TensorShapeProto.Dim(size=size) for size in shape]
    return tensor_shape_pb2.TensorShapeProto(dim=dims)


def _outputs(prediction: Prediction) -> dict[str, tensor_pb2.TensorProto]:
    probabilities = prediction.probabilities
    top = probabilities.argmax(axis=1)
    return {
        "probabilities": _float_tensor(probabilities),
        "label": _string_tensor([prediction.labels[i] for i in top]),
        "score": _float_tensor(probabilities[np.arange(len(top)), top]),
    }


def _example_image(example: example_pb2.Example, context: example_pb2.Example) -> bytes:
    for source in (example, context):
        feature = source.features.feature.get(IMAGE_FEATURE)
        if feature is not None and len(feature.bytes_list.value) == 1:
            return feature.bytes_list.value[0]
    raise BadRequest(
        f"every tf.Example needs a bytes feature {IMAGE_FEATURE!r} holding one encoded image"
    )


def _examples(request: classification_pb2.ClassificationRequest) -> list[bytes]:
    kind = request.input.WhichOneof("kind")
    if kind == "example_list":
        examples, context = request.input.example_list.examples, example_pb2.Example()
    elif kind == "example_list_with_context":
        source = request.input.example_list_with_context
        examples, context = source.examples, source.context
    else:
        raise BadRequest("ClassificationRequest.input holds no examples")
    return [_example_image(example, context) for example in examples]


def signature_def_map(signatures: dict) -> get_model_metadata_pb2.SignatureDefMap:
    """TF Serving's JSON signature_def shape (LoadedModel.signatures) -> SignatureDefMap."""
    return json_format.ParseDict(
        {"signature_def": signatures}, get_model_metadata_pb2.SignatureDefMap()
    )


def _model_spec(name: str, version: int, signature: str = "") -> model_pb2.ModelSpec:
    return model_pb2.ModelSpec(
        name=name, version=wrappers_pb2.Int64Value(value=version), signature_name=signature
    )


class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway

    async def _predict(
        self,
        images: list[bytes],
        model: str,
        version: int | None,
        context: grpc.aio.ServicerContext,
        route: str,
    ) -> Prediction:
        return await self._gateway.predict(
            images,
            model=model or None,
            version=version,
            protocol=PROTOCOL,
            deadline=deadline_of(context),
            route=route,
        )

    async def _predict_response(
        self, request: predict_pb2.PredictRequest, context: grpc.aio.ServicerContext
    ) -> predict_pb2.PredictResponse:
        with rejecting(self._gateway, PREDICT_ROUTE):
            version = _version(request.model_spec)
            signature = _signature(request.model_spec)
            wanted = _output_names(request.output_filter)
            images = _inputs(request, signature)
        prediction = await self._predict(
            images, request.model_spec.name, version, context, PREDICT_ROUTE
        )
        outputs = _outputs(prediction)
        return predict_pb2.PredictResponse(
            model_spec=_model_spec(prediction.model, prediction.version, signature),
            outputs={name: outputs[name] for name in wanted},
        )

    async def Predict(
        self, request: predict_pb2.PredictRequest, context: grpc.aio.ServicerContext
    ) -> predict_pb2.PredictResponse:
        return await guarded(context, self._predict_response(request, context))

    async def _classify_response(
        self, request: classification_pb2.ClassificationRequest, context: grpc.aio.ServicerContext
    ) -> classification_pb2.ClassificationResponse:
        with rejecting(self._gateway, CLASSIFY_ROUTE):
            version = _version(request.model_spec)
            if _signature(request.model_spec) != SERVING_SIGNATURE:
                raise BadRequest(f"Classify runs the {SERVING_SIGNATURE!r} signature only")
            images = _examples(request)
        prediction = await self._predict(
            images, request.model_spec.name, version, context, CLASSIFY_ROUTE
        )
        # One Classifications per example, every class in label order (TF Serving's layout).
        result = classification_pb2.ClassificationResult(
            classifications=[
                classification_pb2.Classifications(
                    classes=[
                        classification_pb2.Class(label=label, score=float(score))
                        for label, score in zip(prediction.labels, row, strict=True)
                    ]
                )
                for row in prediction.probabilities
            ]
        )
        return classification_pb2.ClassificationResponse(
            model_spec=_model_spec(prediction.model, prediction.version, SERVING_SIGNATURE),
            result=result,
        )

    async def Classify(
        self, request: classification_pb2.ClassificationRequest, context: grpc.aio.ServicerContext
    ) -> classification_pb2.ClassificationResponse:
        return await guarded(context, self._classify_response(request, context))

    async def _metadata_response(
        self, request: get_model_metadata_pb2.GetModelMetadataRequest
    ) -> get_model_metadata_pb2.GetModelMetadataResponse:
        name = request.model_spec.name
        with self._gateway.observe(PROTOCOL, METADATA_ROUTE, name) as outcome:
            fields = set(request.metadata_field)
            if fields != {SIGNATURE_DEF_FIELD}:
                raise BadRequest(
                    f"metadata_field must be [{SIGNATURE_DEF_FIELD!r}] (the only metadata graft "
                    f"serves), got {sorted(fields)}"
                )
            if not name:
                raise BadRequest("model_spec.name is required")
            metadata = await self._gateway.metadata(name, _version(request.model_spec))
            outcome["version"] = str(metadata.version)
        response = get_model_metadata_pb2.GetModelMetadataResponse(
            model_spec=_model_spec(metadata.name, metadata.version)
        )
        response.metadata[SIGNATURE_DEF_FIELD].Pack(signature_def_map(metadata.signatures))
        return response

    async def GetModelMetadata(
        self,
        request: get_model_metadata_pb2.GetModelMetadataRequest,
        context: grpc.aio.ServicerContext,
    ) -> get_model_metadata_pb2.GetModelMetadataResponse:
        return await guarded(context, self._metadata_response(request))

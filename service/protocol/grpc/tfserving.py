"""tensorflow.serving.PredictionService on top of the shared Gateway.

Clients that already use TensorFlow Serving's stock `PredictionServiceStub` point it at graft
unchanged: `Predict` (signature `serving_default` takes `images`, a DT_STRING [n] tensor of
encoded images; `serve_pixels` takes `pixels`, DT_UINT8 [n, h, w, 3]), `GetModelMetadata`
(signature_def) and `Classify` (tf.Example inputs whose `image/encoded` feature holds the
bytes). Everything runs through the Gateway, so it shares batches, limits and metrics with HTTP.
"""

import asyncio
from collections.abc import Sequence

import grpc
import numpy as np
from google.protobuf import wrappers_pb2

from service.errors import BadRequest
from service.gateway import Gateway, Prediction
from service.gateway.request_metrics import observe
from service.protocol.grpc.tensors import (
    bool_tensor,
    encoded_images,
    examples,
    float_tensor,
    pixel_images,
    signature_def_map,
    string_tensor,
)
from service.protocol.grpc_status import PROTOCOL, client_key, deadline_of, guarded, rejecting
from service.store.layout import (
    OOD_FLAG_OUTPUT,
    OOD_OUTPUTS,
    OOD_SCORE_OUTPUT,
    OUTPUTS,
    SERVING_SIGNATURE,
    SIGNATURE_INPUTS,
)
from service.stubs.tensorflow.core.framework import tensor_pb2
from service.stubs.tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    model_pb2,
    predict_pb2,
    prediction_service_pb2_grpc,
)

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


def _inputs(request: predict_pb2.PredictRequest, signature: str, gateway: Gateway) -> list[bytes]:
    wanted = SIGNATURE_INPUTS[signature]
    if set(request.inputs) != {wanted}:
        raise BadRequest(
            f"signature {signature!r} takes exactly one input, {wanted!r}; "
            f"got {sorted(request.inputs)}"
        )
    tensor = request.inputs[wanted]
    if signature == SERVING_SIGNATURE:
        return encoded_images(tensor, gateway.check_image_count)
    return pixel_images(tensor, gateway.check_pixel_images)


def _output_names(output_filter: Sequence[str]) -> list[str]:
    """The outputs to answer: the filter's (checked), else all (the OOD ones where the version
    has them)."""
    known = (*OUTPUTS, *OOD_OUTPUTS)
    unknown = sorted(set(output_filter) - set(known))
    if unknown:
        raise BadRequest(f"output_filter names unknown outputs {unknown}; outputs are {known}")
    return [name for name in known if not output_filter or name in output_filter]


def _outputs(prediction: Prediction) -> dict[str, tensor_pb2.TensorProto]:
    labels, scores = prediction.top1()
    outputs = {
        "probabilities": float_tensor(prediction.probabilities),
        "label": string_tensor(labels),
        "score": float_tensor(np.asarray(scores)),
    }
    ood = prediction.ood_columns()
    if ood:  # versions trained with the out-of-distribution flag
        outputs[OOD_SCORE_OUTPUT] = float_tensor(np.asarray(ood[OOD_SCORE_OUTPUT]))
        outputs[OOD_FLAG_OUTPUT] = bool_tensor(ood[OOD_FLAG_OUTPUT])
    return outputs


def _filtered(
    outputs: dict[str, tensor_pb2.TensorProto], output_filter: Sequence[str], prediction: Prediction
) -> dict[str, tensor_pb2.TensorProto]:
    """The outputs `output_filter` names (all when it names none): an OOD output named for a
    version without the flag is an error."""
    wanted = _output_names(output_filter)
    missing = [name for name in wanted if name not in outputs]
    if missing and output_filter:
        raise BadRequest(
            f"output_filter names {missing}, which model {prediction.model!r} version "
            f"{prediction.version} lacks (trained before the out-of-distribution flag)"
        )
    return {name: outputs[name] for name in wanted if name in outputs}


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
            client_key=client_key(context),
        )

    async def _predict_response(
        self, request: predict_pb2.PredictRequest, context: grpc.aio.ServicerContext
    ) -> predict_pb2.PredictResponse:
        with rejecting(PREDICT_ROUTE):
            version = _version(request.model_spec)
            signature = _signature(request.model_spec)
            _output_names(request.output_filter)  # refused before the images are decoded
            # PNG-encoding pixels costs CPU: never on the event loop (other requests, /livez).
            images = await asyncio.to_thread(_inputs, request, signature, self._gateway)
        prediction = await self._predict(
            images, request.model_spec.name, version, context, PREDICT_ROUTE
        )
        return predict_pb2.PredictResponse(
            model_spec=_model_spec(prediction.model, prediction.version, signature),
            outputs=_filtered(_outputs(prediction), request.output_filter, prediction),
        )

    async def Predict(
        self, request: predict_pb2.PredictRequest, context: grpc.aio.ServicerContext
    ) -> predict_pb2.PredictResponse:
        return await guarded(context, self._predict_response(request, context))

    async def _classify_response(
        self, request: classification_pb2.ClassificationRequest, context: grpc.aio.ServicerContext
    ) -> classification_pb2.ClassificationResponse:
        with rejecting(CLASSIFY_ROUTE):
            version = _version(request.model_spec)
            if _signature(request.model_spec) != SERVING_SIGNATURE:
                raise BadRequest(f"Classify runs the {SERVING_SIGNATURE!r} signature only")
            images = examples(request, self._gateway.check_image_count)
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
        with observe(PROTOCOL, METADATA_ROUTE, name) as outcome:
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

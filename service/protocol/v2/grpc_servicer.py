"""The Open Inference Protocol (KServe V2) over gRPC: `inference.GRPCInferenceService`.

Registered by service/protocol/grpc/server.py on the same port as graft.v1 and TF Serving.
ModelInfer takes its input as `raw_input_contents` (what tritonclient sends) or as typed
`contents` (`bytes_contents` for BYTES, `uint_contents` for UINT8), and answers in the same
form: `raw_output_contents` when the request used raw inputs, typed `contents` otherwise.
Errors are gRPC status codes with graft's `graft-error-code` trailer; metrics carry protocol
"v2-grpc". The repository RPCs (load / unload) answer UNIMPLEMENTED: graft loads what the
repository holds.
"""

from typing import Any

import grpc

from service.errors import BadRequest
from service.gateway import Gateway
from service.gateway.request_metrics import observe
from service.protocol.grpc_status import client_key, deadline_of, guarded, rejecting
from service.protocol.v2.models import (
    EXTENSIONS,
    SERVER_NAME,
    SERVER_VERSION,
    ModelRef,
    model_metadata,
    model_ready,
    resolve,
)
from service.protocol.v2.tensors import (
    BOOL,
    BYTES,
    UINT8,
    Elements,
    InputTensor,
    OutputTensor,
    Raw,
    TensorMeta,
    build_outputs,
    checked_name,
    checked_shape,
    output_names,
    request_images,
    top_k_parameter,
)
from service.stubs.kserve import grpc_predict_v2_pb2 as pb
from service.stubs.kserve import grpc_predict_v2_pb2_grpc as pb_grpc

PROTOCOL = "v2-grpc"
SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
# Metric route labels: the gRPC method paths.
INFER_ROUTE = f"/{SERVICE}/ModelInfer"
METADATA_ROUTE = f"/{SERVICE}/ModelMetadata"
READY_ROUTE = f"/{SERVICE}/ModelReady"


def _parameter(parameter: pb.InferParameter) -> Any:
    kind = parameter.WhichOneof("parameter_choice")
    return None if kind is None else getattr(parameter, kind)


def _top_k(request: pb.ModelInferRequest) -> Any:
    return _parameter(request.parameters["top_k"]) if "top_k" in request.parameters else None


def _inputs(request: pb.ModelInferRequest) -> list[InputTensor]:
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise BadRequest(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs; send "
            "one per input, or typed contents for all of them"
        )
    return [_input(tensor, index, raw) for index, tensor in enumerate(request.inputs)]


def _input(tensor: Any, index: int, raw: Any) -> InputTensor:
    shape = checked_shape(list(tensor.shape), checked_name(tensor.name))
    where = f"input `{tensor.name}`"
    if raw:
        data: Raw | Elements = Raw(raw[index], f"{where} (raw_input_contents[{index}])")
    elif tensor.datatype == UINT8:
        data = Elements(tensor.contents.uint_contents, f"{where} contents.uint_contents")
    else:
        data = Elements(tensor.contents.bytes_contents, f"{where} contents.bytes_contents")
    return InputTensor(tensor.name, tensor.datatype, shape, data)


def _response_tensor(output: OutputTensor, raw: list[bytes] | None) -> Any:
    tensor = pb.ModelInferResponse.InferOutputTensor(
        name=output.name, datatype=output.datatype, shape=list(output.shape)
    )
    if raw is not None:
        raw.append(output.raw())
    elif output.datatype == BYTES:
        tensor.contents.bytes_contents.extend(output.values)
    elif output.datatype == BOOL:
        tensor.contents.bool_contents.extend(output.flat())
    else:
        tensor.contents.fp32_contents.extend(output.flat())
    return tensor


def _tensor_meta(tensor: TensorMeta) -> Any:
    return pb.ModelMetadataResponse.TensorMetadata(
        name=tensor.name, datatype=tensor.datatype, shape=list(tensor.shape)
    )


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._gateway.ready())

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name=SERVER_NAME, version=SERVER_VERSION, extensions=list(EXTENSIONS)
        )

    async def _model(self, request: Any, route: str) -> ModelRef:
        with rejecting(route, PROTOCOL):
            return await resolve(self._gateway, request.name, request.version)

    async def _ready(self, request: pb.ModelReadyRequest) -> pb.ModelReadyResponse:
        model = await self._model(request, READY_ROUTE)
        with observe(PROTOCOL, READY_ROUTE, model.name, model.version):
            return pb.ModelReadyResponse(ready=model_ready(self._gateway, model))

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        return await guarded(context, self._ready(request))

    async def _metadata(self, request: pb.ModelMetadataRequest) -> pb.ModelMetadataResponse:
        model = await self._model(request, METADATA_ROUTE)
        with observe(PROTOCOL, METADATA_ROUTE, model.name, model.version) as outcome:
            meta = await model_metadata(self._gateway, model)
            outcome["version"] = str(meta.version)
        return pb.ModelMetadataResponse(
            name=meta.name,
            versions=meta.versions,
            platform=meta.platform,
            inputs=[_tensor_meta(tensor) for tensor in meta.inputs],
            outputs=[_tensor_meta(tensor) for tensor in meta.outputs],
        )

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        return await guarded(context, self._metadata(request))

    async def _infer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        with rejecting(INFER_ROUTE, PROTOCOL):
            model = await resolve(self._gateway, request.model_name, request.model_version)
            top_k = top_k_parameter(_top_k(request))
            requested = [output.name for output in request.outputs] or None
            names = output_names(requested, top_k)
            images = await request_images(_inputs(request), self._gateway)
        prediction = await self._gateway.predict(
            images, model=model.name, version=model.version, protocol=PROTOCOL,
            deadline=deadline_of(context), route=INFER_ROUTE, client_key=client_key(context),
        )  # fmt: skip
        raw: list[bytes] | None = [] if request.raw_input_contents else None
        outputs = [_response_tensor(o, raw) for o in build_outputs(prediction, names, top_k)]
        return pb.ModelInferResponse(
            model_name=prediction.model,
            model_version=str(prediction.version),
            id=request.id,
            outputs=outputs,
            raw_output_contents=raw or [],
        )

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        return await guarded(context, self._infer(request, context))

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelLoadResponse:
        await _unimplemented(context)

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelUnloadResponse:
        await _unimplemented(context)


async def _unimplemented(context: grpc.aio.ServicerContext) -> Any:
    await context.abort(
        grpc.StatusCode.UNIMPLEMENTED,
        "graft loads what its model repository holds: publish a version (graft publish, "
        "POST /models/{name}/versions) or pin one (PUT /models/{name}/policy) instead",
    )

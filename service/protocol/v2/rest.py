"""The Open Inference Protocol (KServe V2) over REST, on the same port as graft's other routes.

    GET  /v2                                           server metadata
    GET  /v2/health/live, /v2/health/ready             liveness, readiness (default model warm)
    GET  /v2/models/{name}[/versions/{v}]              model metadata
    GET  /v2/models/{name}[/versions/{v}]/ready        model readiness
    POST /v2/models/{name}[/versions/{v}]/infer        inference, JSON or binary tensor data

service/protocol/http/routes.py mounts these routes. Every inference goes through the Gateway
(shared batches, limits, metrics with protocol "v2"); an error is `{"error": message, "code":
graft's error code}` with the error's HTTP status.
"""

import json
from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from service.errors import BadRequest, GraftError, Overloaded, validation_message
from service.gateway import Gateway, Prediction
from service.gateway.canary import CLIENT_KEY_HEADER
from service.gateway.request_metrics import observe, rejected
from service.protocol import json_text
from service.protocol.v2.binary import BINARY_MEDIA_TYPE, HEADER_LENGTH, BinarySection, split_body
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

PROTOCOL = "v2"
# Metric route labels: fixed templates, whether or not the request named a version.
INFER_ROUTE = "/v2/models/{name}/infer"
METADATA_ROUTE = "/v2/models/{name}"
READY_ROUTE = "/v2/models/{name}/ready"

GatewayGetter = Callable[[], Gateway]
# A model route's handler: its response, and the version that answered (for the metric).
ModelHandler = Callable[[Gateway, ModelRef], Awaitable[tuple[Response, int | None]]]


class V2Input(BaseModel):
    name: str
    datatype: str
    shape: list[Any]  # checked by checked_shape, which names the input
    parameters: dict[str, Any] = {}
    data: Any = None


class V2Output(BaseModel):
    name: str
    parameters: dict[str, Any] = {}


class V2Request(BaseModel):
    id: str | None = None
    parameters: dict[str, Any] = {}
    inputs: list[V2Input]
    outputs: list[V2Output] | None = None


def v2_routes(get_gateway: GatewayGetter) -> list[Route]:
    api = _Handlers(get_gateway)
    model, versioned = "/v2/models/{name}", "/v2/models/{name}/versions/{version}"
    return [
        Route("/v2", api.server_metadata, methods=["GET"]),
        Route("/v2/health/live", api.live, methods=["GET"]),
        Route("/v2/health/ready", api.ready, methods=["GET"]),
        *(Route(path, api.model_metadata, methods=["GET"]) for path in (model, versioned)),
        *(Route(f"{path}/ready", api.model_ready, methods=["GET"]) for path in (model, versioned)),
        *(Route(f"{path}/infer", api.infer, methods=["POST"]) for path in (model, versioned)),
    ]


def error_response(exc: GraftError) -> JSONResponse:
    headers = {"Retry-After": str(exc.retry_after_s)} if isinstance(exc, Overloaded) else None
    body = {"error": exc.message, "code": exc.code}
    return JSONResponse(body, status_code=exc.http_status, headers=headers)


class _Handlers:
    def __init__(self, get_gateway: GatewayGetter) -> None:
        self._gateway = get_gateway

    async def server_metadata(self, request: Request) -> Response:
        body = {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": list(EXTENSIONS)}
        return JSONResponse(body)

    async def live(self, request: Request) -> Response:
        return JSONResponse({"live": True})

    async def ready(self, request: Request) -> Response:
        ready = self._gateway().ready()
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    async def model_metadata(self, request: Request) -> Response:
        return await self._model_route(request, METADATA_ROUTE, _metadata)

    async def model_ready(self, request: Request) -> Response:
        return await self._model_route(request, READY_ROUTE, _ready)

    async def _model_route(self, request: Request, route: str, handler: ModelHandler) -> Response:
        gateway = self._gateway()
        try:
            model = await _model(gateway, request)
        except GraftError as exc:
            rejected(PROTOCOL, route, exc)
            return error_response(exc)
        try:
            with observe(PROTOCOL, route, model.name, model.version) as outcome:
                response, version = await handler(gateway, model)
                outcome["version"] = "" if version is None else str(version)
                return response
        except GraftError as exc:
            return error_response(exc)

    async def infer(self, request: Request) -> Response:
        gateway = self._gateway()
        try:
            model = await _model(gateway, request)
            parsed, inputs = parse_request(await request.body(), request.headers.get(HEADER_LENGTH))
            top_k = top_k_parameter(parsed.parameters.get("top_k"))
            requested = None if parsed.outputs is None else [o.name for o in parsed.outputs]
            names = output_names(requested, top_k)
            binary = _binary_outputs(parsed, names)
            images = await request_images(inputs, gateway)
        except GraftError as exc:
            rejected(PROTOCOL, INFER_ROUTE, exc)
            return error_response(exc)
        try:
            prediction = await gateway.predict(
                images, model=model.name, version=model.version, protocol=PROTOCOL,
                route=INFER_ROUTE, client_key=request.headers.get(CLIENT_KEY_HEADER),
            )  # fmt: skip
        except GraftError as exc:
            return error_response(exc)
        outputs = build_outputs(prediction, names, top_k)
        return infer_response(prediction, parsed.id, outputs, binary)


async def _model(gateway: Gateway, request: Request) -> ModelRef:
    return await resolve(
        gateway, request.path_params["name"], request.path_params.get("version", "")
    )


async def _metadata(gateway: Gateway, model: ModelRef) -> tuple[Response, int | None]:
    meta = await model_metadata(gateway, model)
    body = {
        "name": meta.name,
        "versions": meta.versions,
        "platform": meta.platform,
        "inputs": [_tensor_meta(tensor) for tensor in meta.inputs],
        "outputs": [_tensor_meta(tensor) for tensor in meta.outputs],
    }
    return JSONResponse(body), meta.version


def _tensor_meta(tensor: TensorMeta) -> dict[str, Any]:
    return {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}


async def _ready(gateway: Gateway, model: ModelRef) -> tuple[Response, int | None]:
    ready = model_ready(gateway, model)
    body = {"name": model.name, "ready": ready}
    return JSONResponse(body, status_code=200 if ready else 503), model.version


def parse_request(body: bytes, header_length: str | None) -> tuple[V2Request, list[InputTensor]]:
    """A REST inference body (JSON, or JSON + binary tensor data) -> the request and its inputs."""
    header, binary = split_body(body, header_length)
    if not header:
        raise BadRequest('the request body is empty; send {"inputs": [...]} as JSON')
    try:
        document = json_text.loads(header)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        hint = "" if header_length else f" (binary tensor data needs the {HEADER_LENGTH} header)"
        raise BadRequest(f"the JSON of the request is not valid: {exc}{hint}") from None
    except RecursionError:
        raise BadRequest("the JSON is nested too deeply") from None
    try:
        parsed = V2Request.model_validate(document)
    except ValidationError as exc:
        raise BadRequest(
            'send {"inputs": [{"name": ..., "datatype": ..., "shape": [...], "data": [...]}]}: '
            f"{validation_message(exc)}"
        ) from None
    inputs = [_input(spec, binary) for spec in parsed.inputs]
    binary.finish()
    return parsed, inputs


def _input(spec: V2Input, binary: BinarySection) -> InputTensor:
    shape = checked_shape(spec.shape, checked_name(spec.name))
    where = f"input `{spec.name}`"
    size = spec.parameters.get("binary_data_size")
    if size is None:
        if spec.data is None:
            raise BadRequest(
                f"{where} has no data: send `data`, or binary tensor data with "
                "parameters.binary_data_size"
            )
        return InputTensor(
            spec.name, spec.datatype, shape, Elements(spec.data, f"{where} data", True)
        )
    if spec.data is not None:
        raise BadRequest(f"{where} has both `data` and parameters.binary_data_size; send one")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise BadRequest(
            f"{where}: parameters.binary_data_size must be a byte count, got {size!r:.40}"
        )
    raw = Raw(binary.take(size, where), f"{where} (binary data)")
    return InputTensor(spec.name, spec.datatype, shape, raw)


def _binary_outputs(parsed: V2Request, names: list[str]) -> dict[str, bool]:
    """Which outputs go as binary tensor data: each output's parameters.binary_data, else the
    request's parameters.binary_data_output (default false)."""
    default = _flag(parsed.parameters, "binary_data_output", "parameters")
    chosen = {
        output.name: _flag(output.parameters, "binary_data", f"output `{output.name}` parameters")
        for output in parsed.outputs or []
    }
    flags = {name: chosen.get(name) for name in names}
    return {name: default if flag is None else flag for name, flag in flags.items()}


def _flag(parameters: dict[str, Any], key: str, where: str) -> bool | None:
    value = parameters.get(key)
    if value is not None and not isinstance(value, bool):
        raise BadRequest(f"{where}.{key} must be true or false, got {value!r:.40}")
    return value


def infer_response(
    prediction: Prediction, request_id: str | None, outputs: list[OutputTensor], binary: dict
) -> Response:
    tensors, parts = [], []
    for output in outputs:
        entry: dict[str, Any] = {
            "name": output.name, "datatype": output.datatype, "shape": list(output.shape),
        }  # fmt: skip
        if binary.get(output.name):
            raw = output.raw()
            entry["parameters"] = {"binary_data_size": len(raw)}
            parts.append(raw)
        else:
            entry["data"] = output.flat()
        tensors.append(entry)
    body: dict[str, Any] = {
        "model_name": prediction.model,
        "model_version": str(prediction.version),
    }
    if request_id is not None:
        body["id"] = request_id
    body["outputs"] = tensors
    header = json.dumps(body, separators=(",", ":")).encode()
    if not parts:
        return Response(header, media_type="application/json")
    headers = {HEADER_LENGTH: str(len(header))}
    return Response(header + b"".join(parts), media_type=BINARY_MEDIA_TYPE, headers=headers)

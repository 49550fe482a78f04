"""The Open Inference Protocol's REST paths for graft's OpenAPI document (/openapi.json), which
service/protocol/http/openapi.py assembles. Self-contained: no shared component references."""

from typing import Any

from service.protocol.v2.tensors import DEFAULT_OUTPUTS, OUTPUT_DATATYPES
from service.store.repository import NAME_PATTERN

# What the request guard (service/protocol/http/guard.py) may answer on any route: a framing
# header sent twice, a body too slow or too large, a pickle body, too much in flight.
GUARD_STATUSES = (400, 408, 413, 415, 503)
_NAME_PATTERN = NAME_PATTERN.pattern

_ERROR = {
    "type": "object",
    "properties": {
        "error": {"type": "string", "description": "What went wrong and what to do about it."},
        "code": {"type": "string", "description": "graft's error code, e.g. `bad_request`."},
    },
    "required": ["error"],
}
_TENSOR = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "datatype": {"type": "string"},
        "shape": {"type": "array", "items": {"type": "integer"}},
        "parameters": {"type": "object"},
        "data": {"type": "array", "description": "Row-major, flat or nested as the shape"},
    },
    "required": ["name", "datatype", "shape"],
}
_INFER_REQUEST = {
    "type": "object",
    "properties": {
        "id": {"type": "string"},
        "parameters": {
            "type": "object",
            "properties": {
                "top_k": {"type": "integer", "minimum": 1},
                "binary_data_output": {"type": "boolean"},
            },
        },
        "inputs": {"type": "array", "items": _TENSOR, "minItems": 1, "maxItems": 1},
        "outputs": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "enum": list(OUTPUT_DATATYPES)},
                    "parameters": {"type": "object"},
                },
            },
        },
    },
    "required": ["inputs"],
}
_MODEL = {
    "name": "name",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": _NAME_PATTERN},
}
_VERSION = {
    "name": "version",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": r"^[1-9][0-9]{0,17}$"},
}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict[str, Any]:
    error = _json(_ERROR, "The protocol's error object")
    return {str(code): error for code in sorted({*codes, *GUARD_STATUSES})}


def _get(summary: str, description: str, *codes: int, params: list | None = None) -> dict:
    responses = {"200": _json({"type": "object"}, description), **_errors(*codes)}
    return {"get": {"summary": summary, "parameters": params or [], "responses": responses}}


def _infer(params: list[dict[str, Any]]) -> dict[str, Any]:
    body = {
        "application/json": {"schema": _INFER_REQUEST},
        "application/octet-stream": {
            "schema": {"type": "string", "format": "binary"},
            "description": "Binary tensor data: JSON of Inference-Header-Content-Length "
            "bytes, then the inputs' raw bytes",
        },
    }
    outputs = ", ".join(DEFAULT_OUTPUTS)
    return {
        "post": {
            "summary": "Open Inference Protocol inference: `images` BYTES [N] or `pixels` "
            f"UINT8 [N, H, W, 3] -> {outputs} (+ top_k_label, top_k_score)",
            "parameters": params,
            "requestBody": {"content": body},
            "responses": {
                "200": _json({"type": "object"}, "model_name, model_version, id, outputs"),
                **_errors(400, 404, 413, 415, 503, 504),
            },
        }
    }


def v2_paths() -> dict[str, Any]:
    model, versioned = [_MODEL], [_MODEL, _VERSION]
    paths = {
        "/v2": _get("Open Inference Protocol server metadata", "name, version, extensions"),
        "/v2/health/live": _get("Open Inference Protocol liveness", '{"live": true}'),
        "/v2/health/ready": _get("Readiness: the default model is warm", '{"ready": true}', 503),
    }
    for path, params in (
        ("/v2/models/{name}", model),
        ("/v2/models/{name}/versions/{version}", versioned),
    ):
        paths[path] = _get(
            "Model metadata",
            "name, versions, platform, inputs, outputs",
            400,
            404,
            503,
            params=params,
        )
        paths[f"{path}/ready"] = _get(
            "Model readiness", '{"name", "ready"}', 400, 404, 503, params=params
        )
        paths[f"{path}/infer"] = _infer(params)
    return paths

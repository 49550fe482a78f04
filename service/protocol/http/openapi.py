"""The OpenAPI 3.1 document of graft's HTTP API, served at /openapi.json.

BentoML's generated spec (/docs.json) only knows `@bentoml.api` methods, and graft's routes are
a mounted Starlette app, so the document is assembled here from the pydantic schemas that the
routes really return.
"""

from functools import cache
from typing import Any

from pydantic import BaseModel

from service import __version__
from service.protocol.v2.openapi import GUARD_STATUSES, v2_paths
from service.schemas import DEFAULT_TOP_K, ClassifyResponse, ErrorBody
from service.store.repository import NAME_PATTERN
from service.wire import ModelStatus

_REF = "#/components/schemas/{model}"


@cache
def openapi_document() -> dict[str, Any]:
    schemas: dict[str, Any] = {}
    for model in (ClassifyResponse, ErrorBody, ModelStatus):
        _add_schema(schemas, model)
    return {
        "openapi": "3.1.0",
        "info": {"title": "graft", "version": __version__},
        "paths": {**_paths(), **v2_paths()},  # + the Open Inference Protocol (protocol/v2)
        "components": {
            "schemas": schemas,
            "securitySchemes": {"admin": {"type": "http", "scheme": "bearer"}},
        },
    }


def _add_schema(schemas: dict[str, Any], model: type[BaseModel]) -> None:
    schema = model.model_json_schema(ref_template=_REF)
    schemas.update(schema.pop("$defs", {}))
    schemas[model.__name__] = schema


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": _REF.format(model=name)}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict[str, Any]:
    """ErrorBody answers: `codes`, and those the request guard may give on any route."""
    error = _json(_ref("ErrorBody"), "An ErrorBody naming the problem")
    return {str(code): error for code in sorted({*codes, *GUARD_STATUSES})}


_B64 = {"type": "string", "minLength": 1, "contentEncoding": "base64"}
_IMAGES_B64 = {
    "type": "array",
    "minItems": 1,
    "items": {"type": "object", "properties": {"b64": _B64}, "required": ["b64"]},
}
_MODEL_LIST = {"type": "array", "items": _ref("ModelStatus")}
_BINARY = {"type": "string", "format": "binary"}
_NAME = {"type": "string", "pattern": NAME_PATTERN.pattern}
_VERSION = {"type": "integer", "minimum": 1, "maximum": 10**18 - 1}
_MODEL_PARAM = {"name": "name", "in": "path", "required": True, "schema": _NAME}
_VERSION_PARAM = {"name": "version", "in": "path", "required": True, "schema": _VERSION}
_TF_BODY = {
    "type": "object",
    "properties": {
        "instances": _IMAGES_B64,
        "inputs": {
            "oneOf": [
                _IMAGES_B64,
                {"type": "object", "properties": {"images": _IMAGES_B64}, "required": ["images"]},
            ]
        },
        "signature_name": {"const": "serving_default"},
    },
    "oneOf": [
        {"required": ["instances"], "not": {"required": ["inputs"]}},
        {"required": ["inputs"], "not": {"required": ["instances"]}},
    ],
}


def _paths() -> dict[str, Any]:
    classify_form = {
        "type": "object",
        "properties": {
            "images": {"type": "array", "minItems": 1, "items": _BINARY},
            "model": _NAME,
            "version": _VERSION,
            "top_k": {"type": "integer", "minimum": 1, "default": DEFAULT_TOP_K},
        },
        "required": ["images"],
    }
    classify_json = {**classify_form, "properties": {**classify_form["properties"]}}
    classify_json["properties"]["images"] = _IMAGES_B64
    predict = {
        "summary": "TensorFlow Serving REST predict (serving_default)",
        "parameters": [_MODEL_PARAM],
        "requestBody": {
            "required": True,
            **_json(_TF_BODY, 'Rows {"instances": [{"b64": ...}]} or columns {"inputs": ...}'),
        },
        "responses": {
            "200": _json({"type": "object"}, '{"predictions": [...]} or {"outputs": {...}}'),
            **_errors(400, 404, 413, 415, 500, 503, 504),
        },
    }
    admin = [{"admin": []}]
    return {
        "/openapi.json": {
            "get": {
                "summary": "This document",
                "responses": {
                    "200": _json({"type": "object"}, "OpenAPI 3.1"),
                    **_errors(),
                },
            }
        },
        "/classify": {
            "post": {
                "summary": "Classify one or more images",
                "requestBody": {
                    "required": True,
                    "content": {
                        "multipart/form-data": {"schema": classify_form},
                        "application/json": {"schema": classify_json},
                    },
                },
                "responses": {
                    "200": _json(_ref("ClassifyResponse"), "One result per image, in order"),
                    **_errors(400, 404, 413, 415, 500, 503, 504),
                },
            }
        },
        "/v1/models/{name}:predict": {"post": predict},
        "/v1/models/{name}/versions/{version}:predict": {
            "post": {**predict, "parameters": [_MODEL_PARAM, _VERSION_PARAM]}
        },
        "/v1/models/{name}": {
            "get": {
                "summary": "TensorFlow Serving model status",
                "parameters": [_MODEL_PARAM],
                "responses": {
                    "200": _json({"type": "object"}, "model_version_status"),
                    **_errors(404),
                },
            }
        },
        "/v1/models/{name}/versions/{version}": {
            "get": {
                "summary": "TensorFlow Serving status of one version",
                "parameters": [_MODEL_PARAM, _VERSION_PARAM],
                "responses": {
                    "200": _json({"type": "object"}, "model_version_status"),
                    **_errors(404),
                },
            }
        },
        "/v1/models/{name}/metadata": {
            "get": {
                "summary": "TensorFlow Serving model metadata (signature_def)",
                "parameters": [_MODEL_PARAM],
                "responses": {
                    "200": _json({"type": "object"}, "model_spec and metadata"),
                    **_errors(404, 503, 504),
                },
            }
        },
        "/v1/models/{name}/versions/{version}/metadata": {
            "get": {
                "summary": "TensorFlow Serving metadata of one version",
                "parameters": [_MODEL_PARAM, _VERSION_PARAM],
                "responses": {
                    "200": _json({"type": "object"}, "model_spec and metadata"),
                    **_errors(404, 503, 504),
                },
            }
        },
        "/models": {
            "get": {
                "summary": "Every model: versions, states, active version, pin",
                "security": admin,
                "responses": {
                    "200": _json(
                        {"type": "object", "properties": {"models": _MODEL_LIST}},
                        "Model states",
                    ),
                    **_errors(401, 403, 504),
                },
            }
        },
        "/models/{name}/versions": {
            "post": {
                "summary": "Upload a new version (tar.gz of an export folder)",
                "security": admin,
                "parameters": [_MODEL_PARAM],
                "requestBody": {
                    "required": True,
                    "content": {"application/gzip": {"schema": _BINARY}},
                },
                "responses": {
                    "201": _json({"type": "object"}, "The published version"),
                    **_errors(400, 401, 403, 404, 409, 413, 422, 504, 507),
                },
            }
        },
        "/models/{name}/policy": {
            "put": {
                "summary": 'Pin a version ({"pin": N}) or follow the newest ({"pin": null})',
                "security": admin,
                "parameters": [_MODEL_PARAM],
                "requestBody": {
                    "required": True,
                    **_json(
                        {
                            "type": "object",
                            "properties": {"pin": {"oneOf": [_VERSION, {"type": "null"}]}},
                            "required": ["pin"],
                        },
                        "The new policy",
                    ),
                },
                "responses": {
                    "200": _json({"type": "object"}, "The policy now in force"),
                    **_errors(400, 401, 403, 404, 409),
                },
            }
        },
    }

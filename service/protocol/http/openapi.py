"""The OpenAPI 3.1 document of graft's HTTP API, served at /openapi.json.

BentoML's generated spec (/docs.json) only knows `@bentoml.api` methods, and graft's routes are
a mounted Starlette app, so the document is assembled here from the pydantic schemas that the
routes really return.
"""

from functools import cache
from typing import Any

from pydantic import BaseModel

from service import __version__
from service.policy import PolicyAnswer, PolicyBody
from service.protocol.http.pages import ASSET_ROUTE, ASSETS, PAGES
from service.protocol.v2.openapi import GUARD_STATUSES, v2_paths
from service.schemas import DEFAULT_TOP_K, ClassifyResponse, ErrorBody, ExplainResponse
from service.store.repository import NAME_PATTERN
from service.wire import ModelStatus, PromotionAnswer, PromotionBody

_REF = "#/components/schemas/{model}"


@cache
def openapi_document() -> dict[str, Any]:
    schemas: dict[str, Any] = {}
    models = (
        ClassifyResponse, ExplainResponse, ErrorBody, ModelStatus, PolicyBody, PolicyAnswer,
        PromotionBody, PromotionAnswer,
    )  # fmt: skip
    for model in models:
        _add_schema(schemas, model)
    return {
        "openapi": "3.1.0",
        "info": {"title": "graft", "version": __version__},
        # + the Open Inference Protocol (protocol/v2) and graft's pages (protocol/http/pages)
        "paths": {**_paths(), **_promotion_paths(), **v2_paths(), **_page_paths()},
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
            "reject_unknown": {
                "type": "boolean",
                "description": "true: images out of distribution answer the label `unknown` "
                "(400 for a version trained without the flag); absent: the model's policy.",
            },
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
        "/explain": {
            "post": {
                "summary": "Classify images and explain each top-1 class with a Grad-CAM heatmap",
                "description": "The body of /classify. A version exported before explanations "
                "answers 400 `explanations_unavailable`.",
                "requestBody": {
                    "required": True,
                    "content": {
                        "multipart/form-data": {"schema": classify_form},
                        "application/json": {"schema": classify_json},
                    },
                },
                "responses": {
                    "200": _json(_ref("ExplainResponse"), "One explanation per image, in order"),
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
                "parameters": [_MODEL_PARAM, _PROMOTE_PARAM],
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
                "summary": "Set the whole policy: pin, canary, shadow (fields left out are reset)",
                "description": "A canary or shadow version must exist, must not have FAILED (a "
                "canary not be REJECTED either) and must not be the stable version: 400 naming "
                "the field otherwise. A pin of a missing version is 404.",
                "security": admin,
                "parameters": [_MODEL_PARAM],
                "requestBody": {
                    "required": True,
                    **_json(_ref("PolicyBody"), "The new policy"),
                },
                "responses": {
                    "200": _json(_ref("PolicyAnswer"), "The policy now in force"),
                    **_errors(400, 401, 403, 404, 409, 503, 504),
                },
            }
        },
    }


_PROMOTE_PARAM = {
    "name": "promote",
    "in": "query",
    "required": False,
    "description": "always: promoted at once; never: a candidate until a decision is recorded",
    "schema": {"type": "string", "enum": ["always", "never"], "default": "always"},
}


def _promotion_paths() -> dict[str, Any]:
    """Recording a version's promotion (the promotion gate, service/store/promotion.py)."""
    return {
        "/models/{name}/versions/{version}/promotion": {
            "put": {
                "summary": "Promote, reject or hold a version (an operator, or graft push's gate)",
                "security": [{"admin": []}],
                "parameters": [_MODEL_PARAM, _VERSION_PARAM],
                "requestBody": {"required": True, **_json(_ref("PromotionBody"), "The decision")},
                "responses": {
                    "200": _json(_ref("PromotionAnswer"), "The version's promotion record"),
                    **_errors(400, 401, 403, 404, 409, 504),
                },
            }
        }
    }


def _page_paths() -> dict[str, Any]:
    """The web pages and the files they load: HTML, JavaScript and CSS, not JSON."""

    def text(media_type: str, description: str) -> dict[str, Any]:
        return {"description": description, "content": {media_type: {"schema": {"type": "string"}}}}

    summaries = {"/": "graft's page to try a model", "/docs": "This API, in Swagger UI"}
    pages = {
        path: {
            "get": {
                "summary": summaries[path],
                "responses": {"200": text("text/html", "The page"), **_errors()},
            }
        }
        for path in PAGES
    }
    names = {"type": "string", "enum": sorted(ASSETS)}
    asset = {"name": "file", "in": "path", "required": True, "schema": names}
    pages[ASSET_ROUTE] = {
        "get": {
            "summary": "A file the pages load (shipped in the package)",
            "parameters": [asset],
            "responses": {
                "200": {
                    "description": "The file",
                    "content": {
                        media_type.split(";")[0]: {"schema": {"type": "string"}}
                        for media_type in sorted({m for _, m in ASSETS.values()})
                    },
                },
                **_errors(404),
            },
        }
    }
    return pages

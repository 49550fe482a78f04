"""graft's HTTP routes: /classify, TensorFlow Serving REST, and the management API.

A plain Starlette app that the entry service mounts beside BentoML's own routes (/livez,
/readyz, /metrics). Handlers only parse and format: all the work, and every failure, comes
from the Gateway, and a GraftError becomes `ErrorBody` JSON with the error's HTTP status.
"""

import base64
import binascii
import json
import logging
import tempfile
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from service.errors import BadRequest, GraftError, ModelNotFound, Overloaded, UnsupportedMediaType
from service.gateway import Gateway
from service.manager import ModelStatus, VersionState
from service.openapi import openapi_document
from service.repository import validate_name
from service.schemas import ErrorBody

logger = logging.getLogger("graft.http")

GatewayGetter = Callable[[], Gateway]
Handler = Callable[[Request], Awaitable[Response]]

_SPOOL_BYTES = 8 * 1024 * 1024  # larger uploads go to a temporary file, not memory
CLASSIFY_ROUTE = "/classify"
PREDICT_ROUTE = "/v1/models/{name}:predict"


class B64(BaseModel):
    b64: str


class ClassifyJSON(BaseModel):
    images: list[B64]
    model: str | None = None
    version: int | None = None
    top_k: int = 5


class PinBody(BaseModel):
    pin: int | None


def error_response(exc: GraftError) -> JSONResponse:
    headers = {"Retry-After": str(exc.retry_after_s)} if isinstance(exc, Overloaded) else None
    if exc.http_status == 401:
        headers = {"WWW-Authenticate": 'Bearer realm="graft management"'}
    body = ErrorBody(error=exc.code, message=exc.message)
    return JSONResponse(body.model_dump(), status_code=exc.http_status, headers=headers)


def build_app(get_gateway: GatewayGetter) -> Starlette:
    """The Starlette app; `get_gateway` returns the running service's Gateway."""
    api = _Api(get_gateway)
    versioned = "/v1/models/{name}/versions/{version:int}"
    routes = [
        Route(CLASSIFY_ROUTE, api.classify, methods=["POST"]),
        Route(PREDICT_ROUTE, api.tf_predict, methods=["POST"]),
        Route(f"{versioned}:predict", api.tf_predict, methods=["POST"]),
        Route("/v1/models/{name}", api.tf_status, methods=["GET"]),
        Route(versioned, api.tf_status, methods=["GET"]),
        Route("/v1/models/{name}/metadata", api.tf_metadata, methods=["GET"]),
        Route(f"{versioned}/metadata", api.tf_metadata, methods=["GET"]),
        Route("/models", api.list_models, methods=["GET"]),
        Route("/models/{name}/policy", api.set_policy, methods=["PUT"]),
        Route("/models/{name}/versions", api.push, methods=["POST"]),
        Route("/openapi.json", api.openapi, methods=["GET"]),
    ]
    return Starlette(routes=routes)


class _Api:
    def __init__(self, get_gateway: GatewayGetter) -> None:
        self._gateway = get_gateway

    # -- inference ---------------------------------------------------------------------------

    async def classify(self, request: Request) -> Response:
        gateway = self._gateway()
        try:
            images, fields = await _classify_input(request)
        except GraftError as exc:
            return _rejected(gateway, CLASSIFY_ROUTE, exc)
        try:
            response = await gateway.classify(
                images,
                model=fields.model,
                version=fields.version,
                top_k=fields.top_k,
                protocol="http",
                route=CLASSIFY_ROUTE,
            )
        except GraftError as exc:
            return error_response(exc)
        return JSONResponse(response.model_dump())

    async def tf_predict(self, request: Request) -> Response:
        gateway = self._gateway()
        try:
            name = validate_name(request.path_params["name"])
            images, columnar = _tf_instances(await _json(request))
        except GraftError as exc:
            return _rejected(gateway, PREDICT_ROUTE, exc)
        try:
            prediction = await gateway.predict(
                images,
                model=name,
                version=request.path_params.get("version"),
                protocol="http",
                route=PREDICT_ROUTE,
            )
        except GraftError as exc:
            return error_response(exc)
        probabilities = prediction.probabilities
        top = probabilities.argmax(axis=1)
        labels = [prediction.labels[i] for i in top]
        scores = probabilities[np.arange(len(top)), top].tolist()
        if columnar:
            outputs = {"probabilities": probabilities.tolist(), "label": labels, "score": scores}
            return JSONResponse({"outputs": outputs})
        rows = zip(probabilities.tolist(), labels, scores, strict=True)
        predictions = [{"probabilities": p, "label": lb, "score": s} for p, lb, s in rows]
        return JSONResponse({"predictions": predictions})

    async def tf_status(self, request: Request) -> Response:
        return await self._observed(request, "/v1/models/{name}", self._tf_status)

    async def _tf_status(self, request: Request) -> Response:
        name = validate_name(request.path_params["name"])
        status = _find(await self._gateway().models(), name)
        wanted = request.path_params.get("version")
        versions = [v for v in status.versions if wanted is None or v.version == wanted]
        if not versions:
            raise ModelNotFound(f"model {name!r} has no version {wanted}")
        return JSONResponse({"model_version_status": [_tf_version(v) for v in versions]})

    async def tf_metadata(self, request: Request) -> Response:
        return await self._observed(request, "/v1/models/{name}/metadata", self._tf_metadata)

    async def _tf_metadata(self, request: Request) -> Response:
        name = validate_name(request.path_params["name"])
        meta = await self._gateway().metadata(name, request.path_params.get("version"))
        spec = {"name": meta.name, "signature_name": "", "version": str(meta.version)}
        signatures = {"signature_def": {"signature_def": meta.signatures}}
        return JSONResponse({"model_spec": spec, "metadata": signatures})

    # -- management ----------------------------------------------------------------------------

    async def list_models(self, request: Request) -> Response:
        return await self._observed(request, "/models", self._list_models, admin=True)

    async def _list_models(self, request: Request) -> Response:
        statuses = await self._gateway().models()
        return JSONResponse({"models": [s.model_dump(mode="json") for s in statuses]})

    async def set_policy(self, request: Request) -> Response:
        return await self._observed(request, "/models/{name}/policy", self._set_policy, admin=True)

    async def _set_policy(self, request: Request) -> Response:
        name = request.path_params["name"]
        try:
            body = PinBody.model_validate(await _json(request))
        except ValidationError as exc:
            raise BadRequest(f'send {{"pin": N}} or {{"pin": null}}: {_first_error(exc)}') from None
        await self._gateway().set_pin(name, body.pin)
        return JSONResponse({"name": name, "pin": body.pin})

    async def push(self, request: Request) -> Response:
        return await self._observed(request, "/models/{name}/versions", self._push, admin=True)

    async def _push(self, request: Request) -> Response:
        with tempfile.SpooledTemporaryFile(max_size=_SPOOL_BYTES) as upload:
            async for chunk in request.stream():  # RequestGuard caps it at max_push_bytes
                upload.write(chunk)
            if upload.tell() == 0:
                raise BadRequest("the body is empty; send a tar.gz of an export folder")
            upload.seek(0)
            version = await self._gateway().push(request.path_params["name"], upload)
        return JSONResponse({"name": request.path_params["name"], "version": version}, 201)

    async def openapi(self, request: Request) -> Response:
        return JSONResponse(openapi_document())

    async def _observed(
        self,
        request: Request,
        route: str,
        handler: Handler,
        *,
        admin: bool = False,
    ) -> Response:
        gateway = self._gateway()
        try:
            with gateway.observe("http", route, request.path_params.get("name", "")):
                if admin:
                    gateway.authorize(request.headers.get("authorization"))
                return await handler(request)
        except GraftError as exc:
            return error_response(exc)


async def _classify_input(request: Request) -> tuple[list[bytes], ClassifyJSON]:
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type == "multipart/form-data":
        return await _multipart(request)
    if media_type in ("application/json", ""):
        body = await _json(request)
        try:
            parsed = ClassifyJSON.model_validate(body)
        except ValidationError as exc:
            raise BadRequest(
                'send {"images": [{"b64": "<base64>"}], "model": ..., "version": ..., '
                f'"top_k": ...}}: {_first_error(exc)}'
            ) from None
        return [_b64(image.b64, i) for i, image in enumerate(parsed.images)], parsed
    raise UnsupportedMediaType(
        f"/classify takes multipart/form-data (files in the field `images`) or "
        f"application/json, not {media_type!r}"
    )


async def _multipart(request: Request) -> tuple[list[bytes], ClassifyJSON]:
    try:
        return await _parse_multipart(request)
    except (MultiPartException, HTTPException) as exc:  # Starlette wraps it inside an app
        detail = exc.message if isinstance(exc, MultiPartException) else exc.detail
        raise BadRequest(
            f"the multipart body cannot be parsed ({detail}); send multipart/form-data with "
            "the files in the field `images` (curl -F images=@photo.jpg)"
        ) from None


async def _parse_multipart(request: Request) -> tuple[list[bytes], ClassifyJSON]:
    async with request.form(max_files=1000, max_fields=100) as form:
        parts = form.getlist("images")
        if any(not isinstance(part, UploadFile) for part in parts):
            raise BadRequest("`images` must be file parts (curl -F images=@photo.jpg)")
        images = [await part.read() for part in parts if isinstance(part, UploadFile)]
        fields = {k: form.get(k) for k in ("model", "version", "top_k") if form.get(k)}
    try:
        parsed = ClassifyJSON.model_validate({"images": [], **fields})
    except ValidationError as exc:
        raise BadRequest(f"invalid form field: {_first_error(exc)}") from None
    return images, parsed


async def _json(request: Request) -> Any:
    body = await request.body()
    if not body:
        raise BadRequest("the request body is empty; send JSON")
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(f"the body is not valid JSON: {exc}") from None
    except RecursionError:  # json's C decoder refuses nesting deeper than ~1000 levels
        raise BadRequest("the JSON is nested too deeply; send a flat document") from None


def _tf_instances(body: Any) -> tuple[list[bytes], bool]:
    """TF Serving's row ("instances") or columnar ("inputs") format -> images, columnar?"""
    if not isinstance(body, dict) or ("instances" in body) == ("inputs" in body):
        raise BadRequest('send exactly one of "instances" or "inputs" (TF Serving REST format)')
    signature = body.get("signature_name", "serving_default")
    if signature != "serving_default":
        raise BadRequest(
            f"signature {signature!r} is not served over REST; use serving_default "
            "(serve_pixels is available over gRPC)"
        )
    columnar = "inputs" in body
    values = body["inputs"] if columnar else body["instances"]
    if isinstance(values, dict):
        values = values.get("images")
    if not isinstance(values, list):
        raise BadRequest('images must be a list of {"b64": "<base64>"} objects')
    images = [_tf_b64(value, i) for i, value in enumerate(values)]
    return images, columnar


def _tf_b64(value: Any, index: int) -> bytes:
    if isinstance(value, dict) and "images" in value:
        value = value["images"]
    if not isinstance(value, dict) or not isinstance(value.get("b64"), str):
        raise BadRequest(f'instance {index} must be {{"b64": "<base64 image>"}}')
    return _b64(value["b64"], index)


def _b64(text: str, index: int) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"image {index} is not valid base64") from None


def _rejected(gateway: Gateway, route: str, exc: GraftError) -> Response:
    """A request refused while parsing, before it reached the gateway: still counted."""
    gateway.rejected("http", route, exc)
    return error_response(exc)


def _find(statuses: list[ModelStatus], name: str) -> ModelStatus:
    for status in statuses:
        if status.name == name:
            return status
    raise ModelNotFound(f"model {name!r} does not exist in the repository")


def _tf_version(version: Any) -> dict[str, Any]:
    state = {
        VersionState.AVAILABLE: "AVAILABLE",
        VersionState.LOADING: "LOADING",
    }.get(version.state, "END")
    failed = version.state == VersionState.FAILED
    return {
        "version": str(version.version),
        "state": state,
        "status": {
            "error_code": "UNKNOWN" if failed else "OK",
            "error_message": version.reason or "",
        },
    }


def _first_error(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "body"
    return f"{where}: {first['msg']}"

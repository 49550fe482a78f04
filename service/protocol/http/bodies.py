"""Request bodies of the HTTP routes, parsed and checked: JSON, multipart, base64, TF Serving."""

import base64
import binascii
import json
from typing import Any

from pydantic import BaseModel, Field, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request

from service.errors import BadRequest, UnsupportedMediaType, validation_message
from service.protocol import json_text
from service.schemas import DEFAULT_TOP_K
from service.store.layout import PIXELS_SIGNATURE, SERVING_SIGNATURE


class B64(BaseModel):
    b64: str


class ClassifyJSON(BaseModel):
    images: list[B64]
    model: str | None = Field(None, min_length=1)  # "" names no model: refused, not defaulted
    version: int | None = None
    top_k: int = DEFAULT_TOP_K
    # true: images out of distribution answer `unknown`; absent: the model's policy decides
    reject_unknown: bool | None = None


async def classify_input(
    request: Request, route: str = "/classify"
) -> tuple[list[bytes], ClassifyJSON]:
    """The images and fields of a /classify (or /explain: the same body) request."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type == "multipart/form-data":
        return await _multipart(request)
    if media_type in ("application/json", ""):
        body = await json_body(request)
        try:
            parsed = ClassifyJSON.model_validate(body)
        except ValidationError as exc:
            raise BadRequest(
                'send {"images": [{"b64": "<base64>"}], "model": ..., "version": ..., '
                f'"top_k": ...}}: {validation_message(exc)}'
            ) from None
        return [_b64(image.b64, i) for i, image in enumerate(parsed.images)], parsed
    raise UnsupportedMediaType(
        f"{route} takes multipart/form-data (files in the field `images`) or "
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
        # An empty field is a value (refused as such), not an absent one: as in JSON
        names = ("model", "version", "top_k", "reject_unknown")
        fields = {k: form.get(k) for k in names if k in form}
    try:
        parsed = ClassifyJSON.model_validate({"images": [], **fields})
    except ValidationError as exc:
        raise BadRequest(f"invalid form field: {validation_message(exc)}") from None
    return images, parsed


async def json_body(request: Request) -> Any:
    body = await request.body()
    if not body:
        raise BadRequest("the request body is empty; send JSON")
    try:
        return json_text.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(f"the body is not valid JSON: {exc}") from None
    except RecursionError:  # json's C decoder refuses nesting deeper than ~1000 levels
        raise BadRequest("the JSON is nested too deeply; send a flat document") from None


def tf_instances(body: Any) -> tuple[list[bytes], bool]:
    """TF Serving's row ("instances") or columnar ("inputs") format -> images, columnar?"""
    if not isinstance(body, dict) or ("instances" in body) == ("inputs" in body):
        raise BadRequest('send exactly one of "instances" or "inputs" (TF Serving REST format)')
    signature = body.get("signature_name", SERVING_SIGNATURE)
    if signature != SERVING_SIGNATURE:
        raise BadRequest(
            f"signature {signature!r} is not served over REST; use {SERVING_SIGNATURE} "
            f"({PIXELS_SIGNATURE} is available over gRPC)"
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

"""ASGI middleware that runs before BentoML or any route sees a request body.

- `application/vnd.bentoml+pickle` is refused with 415 on every route: BentoML unpickles such
  bodies, and unpickling attacker bytes executes their code. The internal inference service
  still speaks pickle, but only over a Unix socket that BentoML creates for the entry process.
- Bodies over the limit get 413: at once when Content-Length says so, otherwise as soon as the
  streamed bytes pass it (the route sees a PayloadTooLarge error while reading).
- A request with a framing header twice (Content-Type, Content-Length, Transfer-Encoding) gets
  400: which copy a server reads differs between servers, proxies and middlewares.
- BentoML's own web page and its assets are not served (404): its page loads Google Tag Manager
  into the browser of whoever opens the service, and graft serves no page that reaches out.
"""

import re
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import (
    BadRequest,
    GraftError,
    ModelNotFound,
    PayloadTooLarge,
    UnsupportedMediaType,
)
from service.protocol.decimal_text import decimal
from service.schemas import ErrorBody

PICKLE_MEDIA_TYPE = "application/vnd.bentoml+pickle"
_PUSH_PATH = re.compile(r"^/models/[^/]+/versions/?$")
_FRAMING_HEADERS = (b"content-type", b"content-length", b"transfer-encoding")
_BENTOML_PAGE = re.compile(r"^/(|index\.html|static_content/.*|assets/.*)$")


class RequestGuard:
    def __init__(self, app: ASGIApp, max_body_bytes: int, max_push_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_push_bytes = max_push_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self._refusal(scope)
        if refusal is not None:
            await _refuse(send, refusal)
            return
        await self.app(scope, _counting(receive, self._limit(scope)), send)

    def _refusal(self, scope: Scope) -> GraftError | None:
        """Why the request is refused before anything reads it, or None."""
        names = [name.lower() for name, _ in scope["headers"]]
        twice = sorted({n.decode() for n in _FRAMING_HEADERS if names.count(n) > 1})
        if twice:
            return BadRequest(f"the request has {', '.join(twice)} more than once; send each once")
        headers = _headers(scope)
        media_type = headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type == PICKLE_MEDIA_TYPE:
            return UnsupportedMediaType(
                f"{PICKLE_MEDIA_TYPE} bodies are refused: unpickling runs code. "
                "Send JSON or multipart/form-data."
            )
        if _BENTOML_PAGE.match(scope.get("path", "")):
            return ModelNotFound(
                f"graft serves no page at {scope.get('path', '')}; its API is described at "
                "/openapi.json (POST /classify, /v1/models/..., /v2/...)"
            )
        limit = self._limit(scope)
        declared = headers.get("content-length", "")
        size = decimal(declared)
        if size is None and declared.isdigit():  # more digits than any body can have
            return _too_large(limit + 1, limit)
        if size is not None and size > limit:
            return _too_large(size, limit)
        return None

    def _limit(self, scope: Scope) -> int:
        if scope.get("method") == "POST" and _PUSH_PATH.match(scope.get("path", "")):
            return self.max_push_bytes
        return self.max_body_bytes


def _counting(receive: Receive, limit: int) -> Receive:
    seen = 0

    async def wrapped() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise _too_large(seen, limit)
        return message

    return wrapped


def _too_large(size: int, limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"the request body is over {limit} bytes (got at least {size}); send fewer or "
        "smaller images, or raise GRAFT_MAX_BODY_BYTES on the server"
    )


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}


async def _refuse(send: Send, exc: GraftError) -> None:
    body = ErrorBody(error=exc.code, message=exc.message).model_dump_json().encode()
    headers: list[Any] = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    await send({"type": "http.response.start", "status": exc.http_status, "headers": headers})
    await send({"type": "http.response.body", "body": body})

"""ASGI middleware that runs before BentoML or any route sees a request body.

- `application/vnd.bentoml+pickle` is refused with 415 on every route: BentoML unpickles such
  bodies, and unpickling attacker bytes executes their code. The internal inference service
  still speaks pickle, but only over a Unix socket that BentoML creates for the entry process.
- Bodies over the limit get 413: at once when Content-Length says so, otherwise as soon as the
  streamed bytes pass it (the route sees a PayloadTooLarge error while reading).
"""

import re
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import GraftError, PayloadTooLarge, UnsupportedMediaType
from service.schemas import ErrorBody

PICKLE_MEDIA_TYPE = "application/vnd.bentoml+pickle"
_PUSH_PATH = re.compile(r"^/models/[^/]+/versions/?$")


class RequestGuard:
    def __init__(self, app: ASGIApp, max_body_bytes: int, max_push_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_push_bytes = max_push_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        media_type = headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type == PICKLE_MEDIA_TYPE:
            await _refuse(
                send,
                UnsupportedMediaType(
                    f"{PICKLE_MEDIA_TYPE} bodies are refused: unpickling runs code. "
                    "Send JSON or multipart/form-data."
                ),
            )
            return
        limit = self._limit(scope)
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            await _refuse(send, _too_large(int(declared), limit))
            return
        await self.app(scope, _counting(receive, limit), send)

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

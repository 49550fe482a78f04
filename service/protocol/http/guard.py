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
  `/` is graft's own page (service/protocol/http/pages.py), which BentoML's route never sees.
- At most `max_concurrent_requests` requests, and request bodies of at most
  `max_body_bytes_in_flight` bytes together (by Content-Length, or the body limit when there is
  none), are served at once per entry worker; beyond, 503 with Retry-After. Probes and /metrics
  are never refused, so the kubelet and Prometheus see an overloaded server as it is. Pushes
  count as requests, not as bodies: their token is checked before their body is read.
- A body has `body_timeout_s` to arrive (`push_body_timeout_s` for a push): then 408 and the
  connection is closed (a body sent a byte at a time holds a slot, memory and /tmp spool).
- BentoML's plain-text 404 / 405, for a path or method nothing serves, become graft's JSON
  error body, as every other error is (and as /openapi.json says).
"""

import asyncio
import re
from dataclasses import dataclass
from typing import Any

import grpc
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import (
    BadRequest,
    GraftError,
    ModelNotFound,
    Overloaded,
    PayloadTooLarge,
    UnsupportedMediaType,
)
from service.gateway.request_metrics import rejected
from service.protocol.decimal_text import decimal
from service.protocol.http.endpoint_labels import endpoint_label
from service.schemas import ErrorBody
from service.settings import GraftSettings

PICKLE_MEDIA_TYPE = "application/vnd.bentoml+pickle"
_PUSH_PATH = re.compile(r"^/models/[^/]+/versions/?$")
_FRAMING_HEADERS = (b"content-type", b"content-length", b"transfer-encoding")
_BENTOML_PAGE = re.compile(r"^/(index\.html|static_content/.*|assets/.*)$")
_NEVER_REFUSED = frozenset({"/livez", "/readyz", "/healthz", "/metrics"})


class RequestTimeout(GraftError):
    """The request body did not arrive in time; the connection is closed."""

    code, http_status = "request_timeout", 408
    grpc_status = grpc.StatusCode.DEADLINE_EXCEEDED


@dataclass
class _InFlight:
    """What one entry worker is serving now (one event loop: no lock needed)."""

    requests: int = 0
    body_bytes: int = 0


class RequestGuard:
    def __init__(self, app: ASGIApp, settings: GraftSettings) -> None:
        self.app = app
        self.settings = settings
        self.max_body_bytes = settings.max_body_bytes
        self.max_push_bytes = settings.max_push_bytes
        self._in_flight = _InFlight()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self._refusal(scope)
        if refusal is not None:
            await _refuse(send, refusal)
            return
        if scope.get("path") in _NEVER_REFUSED:
            await self.app(scope, _counting(receive, self._limit(scope)), send)
            return
        body_bytes = self._body_reservation(scope)
        overloaded = self._overloaded(body_bytes)
        if overloaded is not None:
            rejected("http", endpoint_label(scope.get("path", "")), overloaded)
            await _refuse(send, overloaded)
            return
        self._in_flight.requests += 1
        self._in_flight.body_bytes += body_bytes
        try:
            await self._serve(scope, receive, send)
        finally:
            self._in_flight.requests -= 1
            self._in_flight.body_bytes -= body_bytes

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the app with the body counted and timed; a late body closes the connection."""
        body = _Body(receive, self._limit(scope), *self._body_timeout(scope))
        started = replaced = False

        async def sending(message: Message) -> None:
            nonlocal started, replaced
            if replaced:  # the plain-text body of an answer already sent as JSON
                return
            if message["type"] == "http.response.start":
                started = True
                if _plain_no_route(message):
                    replaced = True
                    await _refuse(send, _no_route(message), _allow(message))
                    return
                if body.timed_out:  # the rest of the body must not be read as a next request
                    message = {**message, "headers": [*message.get("headers", []), _CLOSE]}
            await send(message)

        try:
            await self.app(scope, body.receive, sending)
        except GraftError as exc:  # raised by the body while an app without handlers read it
            if started:
                raise
            await _refuse(sending, exc)

    def _overloaded(self, body_bytes: int) -> Overloaded | None:
        limits, now = self.settings, self._in_flight
        if now.requests >= limits.max_concurrent_requests:
            return Overloaded(
                f"the server is serving {now.requests} requests, its most at once "
                "(GRAFT_MAX_CONCURRENT_REQUESTS); retry after the Retry-After seconds"
            )
        if body_bytes and now.body_bytes + body_bytes > limits.max_body_bytes_in_flight:
            return Overloaded(
                f"the server is receiving {now.body_bytes} bytes of request bodies, and this "
                f"one's {body_bytes} would pass its most at once "
                f"(GRAFT_MAX_BODY_BYTES_IN_FLIGHT); retry after the Retry-After seconds"
            )
        return None

    def _body_reservation(self, scope: Scope) -> int:
        """The bytes this request's body may take: its Content-Length, or the limit."""
        if self._is_push(scope):
            return 0  # the token is checked before a push's body is read
        headers = _headers(scope)
        size = decimal(headers.get("content-length", ""))
        if size is not None:
            return size
        return self._limit(scope) if "transfer-encoding" in headers else 0

    def _body_timeout(self, scope: Scope) -> tuple[float, str]:
        """Seconds the body may take, and the setting that says so."""
        if self._is_push(scope):
            return self.settings.push_body_timeout_s, "GRAFT_PUSH_BODY_TIMEOUT_S"
        return self.settings.body_timeout_s, "GRAFT_BODY_TIMEOUT_S"

    @staticmethod
    def _is_push(scope: Scope) -> bool:
        return scope.get("method") == "POST" and bool(_PUSH_PATH.match(scope.get("path", "")))

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
        return self.max_push_bytes if self._is_push(scope) else self.max_body_bytes


_CLOSE = (b"connection", b"close")


class MethodNotAllowed(GraftError):
    code, http_status = "method_not_allowed", 405
    grpc_status = grpc.StatusCode.UNIMPLEMENTED


def _plain_no_route(start: Message) -> bool:
    """BentoML's own 404 / 405 for a path or method nothing serves (plain text)."""
    headers = dict(start.get("headers", []))
    plain = headers.get(b"content-type", b"").startswith(b"text/plain")
    return start["status"] in (404, 405) and plain


def _no_route(start: Message) -> GraftError:
    if start["status"] == 405:
        return MethodNotAllowed(f"the method is not served at this path (it takes {_allow(start)})")
    return ModelNotFound("no route serves this path; graft's API is described at /openapi.json")


def _allow(start: Message) -> str:
    return dict(start.get("headers", [])).get(b"allow", b"").decode("latin-1")


class _Body:
    """The request's `receive`, counted against the body limit, with a deadline until the
    body is complete (afterwards `receive` waits for the disconnect, which has none)."""

    def __init__(self, receive: Receive, limit: int, timeout_s: float, setting: str) -> None:
        self._receive = _counting(receive, limit)
        self._timeout_s = timeout_s
        self._setting = setting
        self._deadline = asyncio.get_running_loop().time() + timeout_s
        self._complete = False
        self.timed_out = False

    async def receive(self) -> Message:
        if self._complete:
            return await self._receive()
        remaining = self._deadline - asyncio.get_running_loop().time()
        try:
            message = await asyncio.wait_for(self._receive(), max(remaining, 0))
        except TimeoutError:
            self.timed_out = True
            raise RequestTimeout(
                f"the request body did not arrive within {self._timeout_s:g} s "
                f"({self._setting}); send it at once"
            ) from None
        if message["type"] != "http.request" or not message.get("more_body", False):
            self._complete = True
        return message


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


async def _refuse(send: Send, exc: GraftError, allow: str = "") -> None:
    body = ErrorBody(error=exc.code, message=exc.message).model_dump_json().encode()
    headers: list[Any] = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    if isinstance(exc, Overloaded):
        headers.append((b"retry-after", str(exc.retry_after_s).encode()))
    if allow:
        headers.append((b"allow", allow.encode("latin-1")))
    await send({"type": "http.response.start", "status": exc.http_status, "headers": headers})
    await send({"type": "http.response.body", "body": body})

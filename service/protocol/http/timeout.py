"""BentoML's per-request timeout (`traffic.timeout`), without its memory retention.

BentoML 1.4's `TimeoutMiddleware` arms `loop.call_later(timeout, ...)` for every request and
never cancels it. The timer handle keeps the request's contextvars (BentoML's request context,
so the request and its body) alive until the timeout elapses, long after the answer went out:
memory grows by rate x timeout x request size. Measured in the 10-minute soak: the server's
RSS rose 14 % for the first ~300 s (graft's traffic timeouts are 310-340 s, so that a model
push can finish), then stayed flat. `install()` swaps in the same middleware with the timer
cancelled as soon as the request ends; BentoML looks the class up when it builds each app.
"""

import asyncio
import contextvars
from typing import Any

from bentoml._internal.server.http import traffic
from starlette.responses import JSONResponse
from starlette.types import Receive, Scope, Send


class TimeoutMiddleware(traffic.TimeoutMiddleware):
    """504 when a request has not started its answer within `timeout` seconds (as BentoML's)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Any] = loop.create_future()
        # An empty context: the timer must not hold the request's context variables.
        timer = loop.call_later(
            self.timeout, self._set_timer_out, waiter, context=contextvars.Context()
        )

        async def started(message: Any) -> None:
            if not waiter.done():
                waiter.set_result(None)
            await send(message)

        handler = asyncio.ensure_future(self.app(scope, receive, started))
        try:
            await waiter
        except TimeoutError:
            if handler.cancel():
                message = f"Not able to process the request in {self.timeout} seconds"
                await JSONResponse({"error": message}, status_code=504)(scope, receive, send)
        else:
            await handler
        finally:
            timer.cancel()


def install() -> None:
    traffic.TimeoutMiddleware = TimeoutMiddleware  # type: ignore[misc]

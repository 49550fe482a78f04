"""A do-nothing ASGI app: reads the whole request, answers a small fixed JSON. Measuring the
load generator against it shows the most it can send and its CPU cost per request."""

from typing import Any

_ANSWER = b'{"label": "none", "score": 1.0, "top_k": []}'


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": _ANSWER})

"""BentoML's own request metrics (`bentoml_service_*`), with a bounded `endpoint` label.

BentoML 1.4's RunnerTrafficMetricsMiddleware labels its series with the raw request path, so
every model name in a path (`/v1/models/<anything>`) and every path a scanner tries made new
series for ever (and files in the multiprocess folder). `install(routes)` swaps in the same
middleware with the label bounded: the template of the route that serves the path
(`/v1/models/{name}`), one of BentoML's own paths as it is, or `other`. BentoML looks the
class up when it builds each app, so install before serving.
"""

from collections.abc import Iterable
from typing import Any

from bentoml._internal.context import server_context
from bentoml._internal.server.http import instruments
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send

OTHER = "other"
_BENTOML_PATHS = frozenset({"/", "/livez", "/readyz", "/healthz", "/metrics", "/docs.json"})
_PATH_KEY = "graft.request_path"  # the real path, carried past the label in the scope
_templates: list[Route] = []


def endpoint_label(path: str) -> str:
    """What BentoML's metrics may call `path`: a fixed set of values, whatever is requested."""
    for route in _templates:
        if route.path_regex.match(path):
            return route.path_format  # the template without convertors: {name}, {version}
    if path in _BENTOML_PATHS or path in server_context.service_routes:
        return path
    return OTHER


class _RealPath:
    """Gives the app behind the metrics the path the client asked for."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if _PATH_KEY in scope:
            scope = {**scope, "path": scope[_PATH_KEY]}
        await self.app(scope, receive, send)


class BoundedTrafficMetrics(instruments.RunnerTrafficMetricsMiddleware):
    def __init__(self, app: ASGIApp, **options: Any) -> None:
        super().__init__(_RealPath(app), **options)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and scope.get("path") != "/metrics":
            scope = {**scope, "path": endpoint_label(scope["path"]), _PATH_KEY: scope["path"]}
        await super().__call__(scope, receive, send)


def install(routes: Iterable[BaseRoute]) -> None:
    """Label by these routes' templates from now on."""
    _templates[:] = [route for route in routes if isinstance(route, Route)]
    instruments.RunnerTrafficMetricsMiddleware = BoundedTrafficMetrics  # type: ignore[misc]

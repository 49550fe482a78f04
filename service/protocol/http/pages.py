"""graft's own web pages: `/` (try a model in a browser) and `/docs` (Swagger UI over
/openapi.json).

Everything they load ships in the installed package: graft's files in `static/` beside this
module, Swagger UI's from the `openapi-ui-bundles` package. No file names another host, and the
Content-Security-Policy header on every answer makes the browser refuse anything that would:
an offline, self-hosted service must not phone home (BentoML's own page loaded Google Tag
Manager). The pages call graft's public HTTP API only, as any client would.
"""

from collections.abc import Awaitable, Callable
from functools import cache
from pathlib import Path

from openapi_ui_bundles import swagger_ui
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from service.schemas import ErrorBody

_STATIC = Path(__file__).with_name("static")
_SWAGGER = Path(swagger_ui.static_path)
_JS = "text/javascript; charset=utf-8"
_CSS = "text/css; charset=utf-8"
_HTML = "text/html; charset=utf-8"

# Only the page's own origin; images may also be data: URLs (the heatmaps in /explain's JSON,
# Swagger UI's icons) and blob: URLs (the chosen files, shown before they are sent).
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # a new graft version's page is seen at once
}
PAGES = {"/": "index.html", "/docs": "docs.html"}
# Every file the pages load, by the name in /static/{file}: a fixed set, so no request path
# ever reaches the file system.
ASSETS: dict[str, tuple[Path, str]] = {
    "app.js": (_STATIC / "app.js", _JS),
    "app.css": (_STATIC / "app.css", _CSS),
    "docs.js": (_STATIC / "docs.js", _JS),
    "swagger-ui-bundle.js": (_SWAGGER / "swagger-ui-bundle.js", _JS),
    "swagger-ui.css": (_SWAGGER / "swagger-ui.css", _CSS),
}
ASSET_ROUTE = "/static/{file}"


def page_routes() -> list[Route]:
    return [
        *(Route(path, _page(name), methods=["GET"]) for path, name in PAGES.items()),
        Route(ASSET_ROUTE, _asset, methods=["GET"]),
    ]


def _page(name: str) -> Callable[[Request], Awaitable[Response]]:
    async def page(request: Request) -> Response:
        return Response(_read(_STATIC / name), media_type=_HTML, headers=_HEADERS)

    return page


async def _asset(request: Request) -> Response:
    found = ASSETS.get(request.path_params["file"])
    if found is None:
        body = ErrorBody(
            error="not_found",
            message=f"no such file; the pages load only {', '.join(sorted(ASSETS))}",
        )
        return JSONResponse(body.model_dump(), status_code=404)
    path, media_type = found
    return Response(_read(path), media_type=media_type, headers=_HEADERS)


@cache
def _read(path: Path) -> bytes:
    """A shipped file, read once per worker (the largest, Swagger UI's bundle, is 1.5 MB)."""
    return path.read_bytes()

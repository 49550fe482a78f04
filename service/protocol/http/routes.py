"""graft's HTTP routes: /classify, /explain, TensorFlow Serving REST, the management API, the
pages.

A plain Starlette app that the entry service mounts beside BentoML's own routes (/livez,
/readyz, /metrics). Handlers only parse and format: all the work, and every failure, comes
from the Gateway, and a GraftError becomes `ErrorBody` JSON with the error's HTTP status.
"""

import asyncio
import logging
import tempfile
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.convertors import StringConvertor, register_url_convertor
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Match, Route

from service.errors import BadRequest, GraftError, ModelNotFound, Overloaded
from service.gateway import Gateway
from service.gateway.canary import CLIENT_KEY_HEADER
from service.gateway.request_metrics import observe, rejected
from service.policy import PolicyAnswer
from service.protocol.http.bodies import classify_input, json_body, tf_instances
from service.protocol.http.openapi import openapi_document
from service.protocol.http.pages import page_routes
from service.protocol.v2.rest import v2_routes
from service.schemas import ErrorBody
from service.store.repository import validate_name
from service.units import MiB
from service.wire import ModelStatus, PromotionAnswer, VersionState

logger = logging.getLogger("graft.http")

GatewayGetter = Callable[[], Gateway]
Handler = Callable[[Request], Awaitable[Response]]

_SPOOL_BYTES = 8 * MiB  # larger uploads go to a temporary file, not memory
CLASSIFY_ROUTE = "/classify"
EXPLAIN_ROUTE = "/explain"
PREDICT_ROUTE = "/v1/models/{name}:predict"
PROMOTION_ROUTE = "/models/{name}/versions/{version:int}/promotion"


class _ModelNameConvertor(StringConvertor):
    """A path segment without ':', so `/v1/models/{name}` (GET) does not also match
    `/v1/models/x:predict`, and a 405 there names only the methods the path takes."""

    regex = "[^/:]+"


register_url_convertor("model", _ModelNameConvertor())


def error_response(exc: GraftError) -> JSONResponse:
    headers = {"Retry-After": str(exc.retry_after_s)} if isinstance(exc, Overloaded) else None
    if exc.http_status == 401:
        headers = {"WWW-Authenticate": 'Bearer realm="graft management"'}
    body = ErrorBody(error=exc.code, message=exc.message)
    return JSONResponse(body.model_dump(), status_code=exc.http_status, headers=headers)


def build_app(get_gateway: GatewayGetter) -> Starlette:
    """The Starlette app; `get_gateway` returns the running service's Gateway."""
    api = _Handlers(get_gateway)
    versioned = "/v1/models/{name}/versions/{version:int}"
    routes = [
        Route(CLASSIFY_ROUTE, api.classify, methods=["POST"]),
        Route(EXPLAIN_ROUTE, api.explain, methods=["POST"]),
        Route(PREDICT_ROUTE, api.tf_predict, methods=["POST"]),
        Route(f"{versioned}:predict", api.tf_predict, methods=["POST"]),
        Route("/v1/models/{name:model}", api.tf_status, methods=["GET"]),
        Route(versioned, api.tf_status, methods=["GET"]),
        Route("/v1/models/{name:model}/metadata", api.tf_metadata, methods=["GET"]),
        Route(f"{versioned}/metadata", api.tf_metadata, methods=["GET"]),
        Route("/models", api.list_models, methods=["GET"]),
        Route("/models/{name}/policy", api.set_policy, methods=["PUT"]),
        Route("/models/{name}/versions", api.push, methods=["POST"]),
        Route(PROMOTION_ROUTE, api.set_promotion, methods=["PUT"]),
        Route("/openapi.json", api.openapi, methods=["GET"]),
        *page_routes(),  # graft's own pages: / and /docs (service/protocol/http/pages.py)
        *v2_routes(get_gateway),  # the Open Inference Protocol (service/protocol/v2)
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: _no_route})


async def _no_route(request: Request, exc: Exception) -> Response:
    """A method no route serves: the JSON error body too, not Starlette's plain text (paths
    that no route serves at all are answered by BentoML, whose 404 the request guard turns
    into JSON)."""
    assert isinstance(exc, HTTPException)
    if exc.status_code == 405:
        return _method_not_allowed(request, allow=_allowed(request))
    body = ErrorBody(error="not_found", message="no route serves this path; see /openapi.json")
    return JSONResponse(body.model_dump(), status_code=exc.status_code, headers=exc.headers)


def _allowed(request: Request) -> str:
    """Every method this path takes: Starlette's 405 names only the first matching route's."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        if isinstance(route, Route) and route.matches(request.scope)[0] != Match.NONE:
            methods |= route.methods or set()
    return ", ".join(sorted(methods))


def _method_not_allowed(request: Request, allow: str) -> JSONResponse:
    message = f"{request.method} is not served at this path (it takes {allow or 'none'})"
    body = ErrorBody(error="method_not_allowed", message=message)
    return JSONResponse(body.model_dump(), status_code=405, headers={"Allow": allow})


class _Handlers:
    """One method per route; each parses, calls the Gateway and formats."""

    def __init__(self, get_gateway: GatewayGetter) -> None:
        self._gateway = get_gateway

    # -- inference ---------------------------------------------------------------------------

    async def classify(self, request: Request) -> Response:
        return await self._answer(request, CLASSIFY_ROUTE)

    async def explain(self, request: Request) -> Response:
        """/classify's body; the answer adds each image's heatmap PNGs (base64)."""
        return await self._answer(request, EXPLAIN_ROUTE)

    async def _answer(self, request: Request, route: str) -> Response:
        """/classify and /explain: one body, one version choice (pin, canary, the sticky
        X-Graft-Client key), one policy; only the gateway call and the encoding differ."""
        gateway = self._gateway()
        try:
            images, fields = await classify_input(request, route)
        except GraftError as exc:
            return _rejected(route, exc)
        explain = route == EXPLAIN_ROUTE
        try:
            response = await (gateway.explain if explain else gateway.classify)(
                images,
                model=fields.model,
                version=fields.version,
                top_k=fields.top_k,
                protocol="http",
                route=route,
                client_key=request.headers.get(CLIENT_KEY_HEADER),
                reject_unknown=fields.reject_unknown,
            )
        except GraftError as exc:
            return error_response(exc)
        if not explain:
            return JSONResponse(response.model_dump())
        # Megabytes of base64 PNGs for a full request: encoded off the event loop too.
        body = await asyncio.to_thread(response.model_dump_json)
        return Response(body, media_type="application/json")

    async def tf_predict(self, request: Request) -> Response:
        gateway = self._gateway()
        try:
            name = validate_name(request.path_params["name"])
            images, columnar = tf_instances(await json_body(request))
        except GraftError as exc:
            return _rejected(PREDICT_ROUTE, exc)
        try:
            prediction = await gateway.predict(
                images,
                model=name,
                version=request.path_params.get("version"),
                protocol="http",
                route=PREDICT_ROUTE,
                client_key=request.headers.get(CLIENT_KEY_HEADER),
            )
        except GraftError as exc:
            return error_response(exc)
        probabilities = prediction.probabilities
        labels, scores = prediction.top1()
        ood = prediction.ood_columns()  # the signature's extra outputs, where it has them
        if columnar:
            outputs = {"probabilities": probabilities.tolist(), "label": labels, "score": scores}
            return JSONResponse({"outputs": {**outputs, **ood}})
        rows = zip(probabilities.tolist(), labels, scores, strict=True)
        predictions = [{"probabilities": p, "label": lb, "score": s} for p, lb, s in rows]
        for index, row in enumerate(predictions):
            row.update({name: values[index] for name, values in ood.items()})
        return JSONResponse({"predictions": predictions})

    async def tf_status(self, request: Request) -> Response:
        if request.path_params["name"].endswith(":predict"):  # GET of the predict route
            return _method_not_allowed(request, allow="POST")
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
        # TF Serving answers `signature_def` only; `runtime` and `device` are graft's (what runs
        # the network, and where).
        metadata = {
            "signature_def": {"signature_def": meta.signatures},
            "runtime": meta.runtime,
            "device": meta.device,
        }
        return JSONResponse({"model_spec": spec, "metadata": metadata})

    # -- management ----------------------------------------------------------------------------

    async def list_models(self, request: Request) -> Response:
        return await self._observed(request, "/models", self._list_models, admin=True)

    async def _list_models(self, request: Request) -> Response:
        statuses = await self._gateway().models()
        return JSONResponse({"models": [s.model_dump(mode="json") for s in statuses]})

    async def set_policy(self, request: Request) -> Response:
        return await self._observed(request, "/models/{name}/policy", self._set_policy, admin=True)

    async def _set_policy(self, request: Request) -> Response:
        """Pin, canary, shadow (service/policy.py); PUT replaces the whole policy."""
        name = request.path_params["name"]
        document = await json_body(request)
        policy = await self._gateway().management.set_policy(name, document)
        return JSONResponse(PolicyAnswer(name=name, **dict(policy)).model_dump(mode="json"))

    async def push(self, request: Request) -> Response:
        return await self._observed(request, "/models/{name}/versions", self._push, admin=True)

    async def _push(self, request: Request) -> Response:
        with tempfile.SpooledTemporaryFile(max_size=_SPOOL_BYTES) as upload:
            async for chunk in request.stream():  # RequestGuard caps it at max_push_bytes
                upload.write(chunk)
            if upload.tell() == 0:
                raise BadRequest("the body is empty; send a tar.gz of an export folder")
            upload.seek(0)
            promote = request.query_params.get("promote", "always")
            management = self._gateway().management
            version = await management.push(request.path_params["name"], upload, promote)
        return JSONResponse({"name": request.path_params["name"], "version": version}, 201)

    async def set_promotion(self, request: Request) -> Response:
        return await self._observed(
            request, "/models/{name}/versions/{version}/promotion", self._set_promotion, admin=True
        )

    async def _set_promotion(self, request: Request) -> Response:
        name, version = request.path_params["name"], request.path_params["version"]
        body = await json_body(request)
        record = await self._gateway().management.set_promotion(name, version, body)
        answer = PromotionAnswer(name=name, version=version, **dict(record))
        return JSONResponse(answer.model_dump(mode="json"))

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
            with observe("http", route, request.path_params.get("name", "")):
                if admin:
                    gateway.management.authorize(request.headers.get("authorization"))
                return await handler(request)
        except GraftError as exc:
            return error_response(exc)


def _rejected(route: str, exc: GraftError) -> Response:
    """A request refused while parsing, before it reached the gateway: still counted."""
    rejected("http", route, exc)
    return error_response(exc)


def _find(statuses: list[ModelStatus], name: str) -> ModelStatus:
    for status in statuses:
        if status.name == name:
            return status
    raise ModelNotFound(f"model {name!r} does not exist in the repository")


_FAILED_MESSAGE = (
    "this version failed to load and is not served; GET /models (management API) and the "
    "server log give the reason"
)


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
            # The reason names server paths and files: only the management API shows it.
            "error_message": _FAILED_MESSAGE if failed else "",
        },
    }

"""The gateway: what every protocol (HTTP routes, the gRPC servicers) calls to classify.

It lives on the entry side and never imports TensorFlow. It validates requests, admits them
against a bounded queue, resolves the model version, sends the images to the inference side
(where they join adaptive batches with every other caller's images) and turns probabilities
into answers. Every caller-visible failure is a `service.errors.GraftError`; protocols only
translate it (HTTP status, gRPC status).
"""

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import Required, TypedDict, TypeVar, Unpack

from service.errors import (
    BadRequest,
    GraftError,
    ImageTooLarge,
    ModelNotFound,
    NotReady,
    PayloadTooLarge,
)
from service.gateway.admission import Admission
from service.gateway.backend_calls import call_backend
from service.gateway.canary import Route
from service.gateway.explanations import Served, explain_response
from service.gateway.management import Management
from service.gateway.request_metrics import observe, record_served
from service.gateway.results import Prediction, raise_first_error
from service.gateway.trials import Trials
from service.image_check import check_image, header_cost
from service.schemas import ClassifyResponse, ExplainResponse
from service.settings import GraftSettings
from service.store.repository import validate_name
from service.wire import InferenceBackend, InferItem, InferResult, ModelMetadata, ModelStatus

logger = logging.getLogger("graft.gateway")


@dataclass(frozen=True)
class InferenceRequest:
    """One classification request on its way to the inference side."""

    images: list[bytes]
    model: str
    version: int | None  # None: the active version
    deadline: float  # time.monotonic() instant, for the whole request, retry included
    protocol: str
    explain: bool = False  # the heatmaps too (the version's `explain` signature)
    client_key: str | None = None  # X-Graft-Client: keeps a client on one side of a canary
    reject_unknown: bool = False  # out-of-distribution images answer `unknown`
    reject_asked: bool = False  # by the request (not the policy): needs a version with the flag


class Ask(TypedDict, total=False):
    """What a request asks beside its images, on every protocol."""

    model: Required[str | None]  # None: GRAFT_DEFAULT_MODEL
    version: Required[int | None]  # None: the policy's choice (stable, canary, pin)
    protocol: Required[str]
    deadline: float | None  # time.monotonic() instant; None: GRAFT_REQUEST_TIMEOUT_S from now
    route: str  # the metrics' route label
    client_key: str | None  # X-Graft-Client: keeps a client on one side of a canary
    reject_unknown: bool | None  # out-of-distribution images answer `unknown`; None: the policy


_Answer = TypeVar("_Answer")


def _not_draining() -> bool:
    return False


def _check_top_k(top_k: int) -> None:
    if top_k < 1:
        raise BadRequest(f"top_k must be at least 1, got {top_k}")


def _predicted(served: Served, prediction: Prediction) -> Prediction:
    return prediction


class Gateway:
    def __init__(
        self,
        backend: InferenceBackend,
        settings: GraftSettings,
        draining: Callable[[], bool] = _not_draining,
    ) -> None:
        self._backend = backend
        self._settings = settings
        self._draining = draining
        self._admission = Admission(settings.max_queue)
        self._status: dict[str, ModelStatus] = {}
        self._metadata: dict[tuple[str, int], ModelMetadata] = {}
        self.management = Management(backend, settings)
        self._trials = Trials(
            backend,
            self.management.repository,
            settings,
            labels=self._labels,
        )

    async def refresh_status(self) -> list[ModelStatus]:
        statuses = await self._backend.status()
        self._status = {s.name: s for s in statuses}
        record_served(statuses)
        return statuses

    async def watch_status(self, interval_s: float = 0.5) -> None:
        """Keep the cached model states fresh (readiness, version resolution); runs forever."""
        while True:
            try:
                await self.refresh_status()
            except Exception as exc:  # inference not up yet, or restarting: keep trying
                logger.debug("model status unavailable: %s", exc)
                self._status = {}  # not ready (gRPC health too) until it answers again
            await asyncio.sleep(interval_s)

    @property
    def settings(self) -> GraftSettings:
        return self._settings

    def model_status(self, name: str) -> ModelStatus | None:
        """`name`'s state as of the last status poll; None if the repository had no such model."""
        return self._status.get(name)

    def ready(self, model: str | None = None) -> bool:
        if self._draining():  # `graft serve` is stopping: load balancers must route elsewhere
            return False
        status = self._status.get(model or self._settings.default_model)
        return status is not None and status.active_version is not None

    async def models(self) -> list[ModelStatus]:
        """Every model's state, with this worker's canary and shadow figures."""
        statuses = await self.refresh_status()
        return [s.model_copy(update={"traffic": self._trials.figures(s)}) for s in statuses]

    async def _labels(self, model: str, version: int) -> list[str]:
        return (await self.metadata(model, version)).labels

    async def metadata(self, model: str, version: int | None) -> ModelMetadata:
        name = validate_name(model)
        resolved = version if version is not None else self._active_version(name)
        if resolved is None:
            raise self._missing(name)
        key = (name, resolved)
        if key not in self._metadata:
            call = self._backend.metadata(name, resolved)
            self._metadata[key] = await call_backend(call, self._deadline(None))
        return self._metadata[key]

    async def classify(
        self, images: list[bytes], *, top_k: int, **ask: Unpack[Ask]
    ) -> ClassifyResponse:
        _check_top_k(top_k)
        prediction = await self._answered(images, ask, "classify", _predicted)
        k = min(top_k, len(prediction.labels))
        return ClassifyResponse(
            model=prediction.model,
            version=prediction.version,
            results=prediction.image_results(k),
        )

    async def explain(
        self, images: list[bytes], *, top_k: int, **ask: Unpack[Ask]
    ) -> ExplainResponse:
        """Top classes and the Grad-CAM heatmap PNGs of `images`: classify's checks, limits,
        version choice and inference batches, on the version's `explain` signature."""
        _check_top_k(top_k)
        answer = partial(explain_response, top_k=top_k)
        return await self._answered(images, ask, "explain", answer, explain=True)

    async def predict(self, images: list[bytes], **ask: Unpack[Ask]) -> Prediction:
        """Probabilities for `images` (see `Ask` for the request's options)."""
        return await self._answered(images, ask, "predict", _predicted)

    async def _answered(
        self,
        images: list[bytes],
        ask: Ask,
        route: str,
        answer: Callable[[Served, Prediction], _Answer],
        *,
        explain: bool = False,
    ) -> _Answer:
        """The one path of every inference call: the request checked, routed (pin, canary,
        sticky key), admitted and inferred, then `answer`ed; `route` is the metrics' label
        where `ask` names none. An explained answer renders PNGs: in a worker thread."""
        name, version = ask["model"] or self._settings.default_model, ask["version"]
        asked = ask.get("reject_unknown")
        with observe(ask["protocol"], ask.get("route", route), name, version) as outcome:
            request = InferenceRequest(
                images, name, version, self._deadline(ask.get("deadline")), ask["protocol"],
                explain=explain, client_key=ask.get("client_key"),
                reject_unknown=self._rejects_unknown(name, asked), reject_asked=bool(asked),
            )  # fmt: skip
            served = await self._served(request)
            prediction = self._prediction(served, request)
            outcome["version"] = str(served.version)
            if explain:
                return await asyncio.to_thread(answer, served, prediction)
            return answer(served, prediction)

    def _prediction(self, served: Served, request: InferenceRequest) -> Prediction:
        prediction = Prediction.of(
            served.model, served.version, served.labels, served.results, request.reject_unknown
        )
        if request.reject_asked and prediction.in_distribution is None:
            raise BadRequest(
                f"reject_unknown: model {served.model!r} version {served.version} has no "
                "out-of-distribution flag (it was trained before graft had one); retrain it "
                "with `graft train` to get it, or send the request without reject_unknown"
            )
        return prediction

    def _rejects_unknown(self, name: str, asked: bool | None) -> bool:
        """The request's `reject_unknown`, else the model's policy (policy.json)."""
        if asked is not None:
            return asked
        status = self._status.get(name)
        return bool(status and status.policy and status.policy.reject_unknown)

    async def _served(self, request: InferenceRequest) -> Served:
        """The request checked, admitted and inferred: its results, all successful."""
        name = validate_name(request.model)
        self.check_image_count(len(request.images))
        images = await asyncio.to_thread(self._validated, request.images)
        checked = replace(request, images=images)
        status = self._status.get(name)
        route = Route(request.version, "named")
        if request.version is None:
            route = self._trials.route(name, status, request.client_key)
        sample = None
        try:
            with self._admission.admitted(len(checked.images)):
                if not request.explain:
                    sample = self._trials.sample(name, status, route, checked.images)
                results, route = await self._routed(name, checked, route)
            raise_first_error(results)
            served = results[0].version
            assert served is not None  # a successful result always names its version
            meta = await self.metadata(name, served)
        except BaseException:
            if sample is not None:
                sample.cancel()
            raise
        self._trials.answered(name, route, meta.labels, results, sample)
        return Served(name, served, meta.labels, checked.images, results)

    async def _routed(
        self, name: str, request: InferenceRequest, route: Route
    ) -> tuple[list[InferResult], Route]:
        """Infer on `route`'s version; a canary's failure is answered by the stable version
        (the caller named no version), and a version swapped out meanwhile by the active one."""
        results = await self._infer(replace(request, version=route.version))
        if self._trials.canary_failed(name, route, results):
            route = route.to_stable()
            results = await self._infer(replace(request, version=route.version))
        if route.arm != "named" and any(r.error_code == ModelNotFound.code for r in results):
            # The cached active version was swapped out twice since the last status poll.
            await self.refresh_status()
            route = Route(self._active_version(name), "stable")
            results = await self._infer(replace(request, version=route.version))
        return results, route

    def check_image_count(self, count: int) -> None:
        """Refuse a request of `count` images (none, or over the limit) before per-image work."""
        if count < 1:
            raise BadRequest("no images in the request; send at least one")
        limit = self._settings.max_images_per_request
        if count > limit:
            # GraftSettings keeps the limit within GRAFT_MAX_QUEUE, so this also refuses, with a
            # 400 rather than an endless 503, every request the queue could never hold.
            raise BadRequest(
                f"{count} images in one request; the limit is {limit}: split it into "
                f"requests of at most {limit} images, or raise GRAFT_MAX_IMAGES_PER_REQUEST "
                "(and GRAFT_MAX_QUEUE with it) on the server"
            )

    def check_pixel_images(self, count: int, height: int, width: int) -> None:
        """Refuse `count` decoded images of `height` x `width` from their shape alone, before
        any pixel is read or encoded: the image count, empty images, the per-image limit."""
        self.check_image_count(count)
        if height < 1 or width < 1:
            raise BadRequest(f"the pixel images are {width}x{height}: an image needs pixels")
        limit = self._settings.max_image_pixels
        if height * width > limit:
            raise ImageTooLarge(
                f"{width}x{height} = {height * width} pixels per image; the limit is {limit}: "
                "send smaller images, or raise GRAFT_MAX_IMAGE_PIXELS"
            )

    def _validated(self, images: list[bytes]) -> list[bytes]:
        """Every image checked (header, structure, EXIF), in a worker thread: it costs CPU.
        The request's budgets first, from the headers: a request over them decodes nothing."""
        self._check_budgets(images)
        limit = self._settings.max_image_pixels
        return [check_image(data, max_pixels=limit, index=i).data for i, data in enumerate(images)]

    def _check_budgets(self, images: list[bytes]) -> None:
        budget, rotated = self._settings.max_request_pixels, self._settings.max_reencoded_pixels
        total = reencoded = 0
        for index, data in enumerate(images):
            cost = header_cost(data)
            total, reencoded = total + cost.pixels, reencoded + cost.reencoded_pixels
            if total > budget:
                raise PayloadTooLarge(
                    f"images 0-{index} of the request hold {total} pixels; the limit per request "
                    f"is {budget} (GRAFT_MAX_REQUEST_PIXELS): send fewer or smaller images per "
                    "request"
                )
            if reencoded > rotated:
                raise PayloadTooLarge(
                    f"images 0-{index} of the request need {reencoded} pixels re-encoded (EXIF "
                    f"rotation, or a BMP variant); the limit per request is {rotated} "
                    "(GRAFT_MAX_REENCODED_PIXELS): rotate the images upright before sending "
                    "(e.g. PIL.ImageOps.exif_transpose), or send fewer of them per request"
                )

    async def _infer(self, request: InferenceRequest) -> list[InferResult]:
        now = time.time()
        items = [
            InferItem(
                model=request.model,
                version=request.version,
                image=image,
                enqueued_at=now,
                protocol=request.protocol,
                reject_unknown=request.reject_unknown,
                explain=request.explain,
            )
            for image in request.images
        ]
        return await call_backend(self._backend.infer(items), request.deadline)

    def _deadline(self, deadline: float | None) -> float:
        if deadline is not None:
            return deadline
        return time.monotonic() + self._settings.request_timeout_s

    def _active_version(self, name: str) -> int | None:
        status = self._status.get(name)
        return status.active_version if status else None

    def _missing(self, name: str) -> GraftError:
        status = self._status.get(name)
        if status is None:
            return ModelNotFound(f"model {name!r} does not exist in the repository")
        return NotReady(f"model {name!r} has no loaded version yet; retry shortly")

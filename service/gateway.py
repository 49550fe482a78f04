"""The gateway: what every protocol (HTTP routes, the gRPC server) calls to classify.

It lives in the entry service's process and never imports TensorFlow. It validates requests,
admits them against a bounded queue, resolves the model version, sends the images to the
inference service (where they join adaptive batches with every other caller's images), turns
probabilities into responses and records the request metrics. Every caller-visible failure is
a `service.errors.GraftError`; protocols only translate it (HTTP status, gRPC status).
"""

import asyncio
import hmac
import logging
import time
from collections.abc import Awaitable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO, Protocol, TypeVar

import numpy as np

from service import metrics
from service.errors import (
    BadRequest,
    DeadlineExceeded,
    GraftError,
    ManagementDisabled,
    ModelNotFound,
    NotReady,
    Overloaded,
    Unauthorized,
)
from service.inference import InferItem, InferResult, ModelMetadata
from service.manager import ModelStatus
from service.push import PushLimits, receive_push
from service.repository import ModelRepository, validate_name
from service.schemas import ClassifyResponse, ImageResult, TopClass
from service.settings import GraftSettings
from service.shutdown import draining
from service.validation import check_image

logger = logging.getLogger("graft.gateway")
T = TypeVar("T")


class InferenceBackend(Protocol):
    """The inference service as the gateway sees it (a BentoML dependency in production)."""

    async def infer(self, items: list[InferItem]) -> list[InferResult]: ...
    async def status(self) -> list[ModelStatus]: ...
    async def metadata(self, model: str, version: int) -> ModelMetadata: ...
    async def refresh(self) -> None: ...
    async def check_export(self, folder: str, name: str) -> None: ...


@dataclass(frozen=True)
class Prediction:
    model: str
    version: int
    labels: list[str]
    probabilities: np.ndarray  # float32 [n, C], one row per image in request order


@dataclass(frozen=True)
class InferenceRequest:
    """One classification request on its way to the inference service."""

    images: list[bytes]
    model: str
    version: int | None  # None: the active version
    deadline: float | None  # time.monotonic() instant; None: GRAFT_REQUEST_TIMEOUT_S from now
    protocol: str


class Gateway:
    def __init__(self, backend: InferenceBackend, settings: GraftSettings) -> None:
        self._backend = backend
        self._settings = settings
        self._repository = ModelRepository(settings.model_root)
        self._status: dict[str, ModelStatus] = {}
        self._metadata: dict[tuple[str, int], ModelMetadata] = {}
        self._queued_images = 0

    # -- model state -------------------------------------------------------------------------

    async def refresh_status(self) -> list[ModelStatus]:
        statuses = await self._backend.status()
        self._status = {s.name: s for s in statuses}
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

    def ready(self, model: str | None = None) -> bool:
        if draining():  # `graft serve` is stopping: load balancers must route elsewhere first
            return False
        status = self._status.get(model or self._settings.default_model)
        return status is not None and status.active_version is not None

    async def models(self) -> list[ModelStatus]:
        return await self.refresh_status()

    async def metadata(self, model: str, version: int | None) -> ModelMetadata:
        name = validate_name(model)
        resolved = version if version is not None else self._active_version(name)
        if resolved is None:
            raise self._missing(name)
        key = (name, resolved)
        if key not in self._metadata:
            self._metadata[key] = await self._call(self._backend.metadata(name, resolved), None)
        return self._metadata[key]

    # -- inference ---------------------------------------------------------------------------

    async def classify(
        self,
        images: list[bytes],
        *,
        model: str | None,
        version: int | None,
        top_k: int,
        protocol: str,
        deadline: float | None = None,
        route: str = "classify",
    ) -> ClassifyResponse:
        if top_k < 1:
            raise BadRequest(f"top_k must be at least 1, got {top_k}")
        prediction = await self.predict(
            images, model=model, version=version, protocol=protocol, deadline=deadline, route=route
        )
        k = min(top_k, len(prediction.labels))
        return ClassifyResponse(
            model=prediction.model,
            version=prediction.version,
            results=[_image_result(row, prediction.labels, k) for row in prediction.probabilities],
        )

    async def predict(
        self,
        images: list[bytes],
        *,
        model: str | None,
        version: int | None,
        protocol: str,
        deadline: float | None = None,
        route: str = "predict",
    ) -> Prediction:
        name = model or self._settings.default_model
        with self.observe(protocol, route, name, version) as outcome:
            request = InferenceRequest(images, name, version, deadline, protocol)
            prediction = await self._predict(request)
            outcome["version"] = str(prediction.version)
            return prediction

    async def _predict(self, request: InferenceRequest) -> Prediction:
        name = validate_name(request.model)
        images = self._validated(request.images)
        deadline = request.deadline
        if deadline is None:  # one deadline for the whole request, retry included
            deadline = time.monotonic() + self._settings.request_timeout_s
        checked = replace(request, images=images, deadline=deadline)
        resolved = request.version if request.version is not None else self._active_version(name)
        with self._admitted(len(images)):
            results = await self._infer(replace(checked, version=resolved))
            if request.version is None and any(r.error_code == ModelNotFound.code for r in results):
                # The cached active version was swapped out twice since the last status poll.
                await self.refresh_status()
                results = await self._infer(replace(checked, version=self._active_version(name)))
        _raise_first_error(results)
        served = results[0].version
        assert served is not None  # a successful result always names its version
        meta = await self.metadata(name, served)
        return Prediction(name, served, meta.labels, np.stack([r.array() for r in results]))

    def _validated(self, images: list[bytes]) -> list[bytes]:
        if not images:
            raise BadRequest("no images in the request; send at least one")
        limit = self._settings.max_images_per_request
        if len(images) > limit:
            # GraftSettings keeps the limit within GRAFT_MAX_QUEUE, so this also refuses, with a
            # 400 rather than an endless 503, every request the queue could never hold.
            raise BadRequest(
                f"{len(images)} images in one request; the limit is {limit}: split it into "
                f"requests of at most {limit} images, or raise GRAFT_MAX_IMAGES_PER_REQUEST "
                "(and GRAFT_MAX_QUEUE with it) on the server"
            )
        pixels = self._settings.max_image_pixels
        return [check_image(data, max_pixels=pixels, index=i).data for i, data in enumerate(images)]

    async def _infer(self, request: InferenceRequest) -> list[InferResult]:
        now = time.time()
        items = [
            InferItem(
                model=request.model,
                version=request.version,
                image=image,
                enqueued_at=now,
                protocol=request.protocol,
            )
            for image in request.images
        ]
        return await self._call(self._backend.infer(items), request.deadline)

    async def _call(self, work: Awaitable[T], deadline: float | None) -> T:
        """Await a backend call under the deadline, mapping transport failures to GraftErrors."""
        if deadline is None:
            deadline = time.monotonic() + self._settings.request_timeout_s
        try:
            return await asyncio.wait_for(work, timeout=max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            raise DeadlineExceeded(
                "the request did not finish before its deadline; retry, or raise "
                "GRAFT_REQUEST_TIMEOUT_S if the model is slow"
            ) from None
        except GraftError:
            raise
        except Exception as exc:
            raise _transport_error(exc) from exc

    @contextmanager
    def _admitted(self, count: int) -> Iterator[None]:
        """Bound the images waiting for inference; refuse at once rather than queue forever."""
        if self._queued_images + count > self._settings.max_queue:
            raise Overloaded(
                f"{self._queued_images} images are already waiting for inference "
                f"(limit {self._settings.max_queue}); retry after a second"
            )
        self._queued_images += count
        metrics.IMAGES_IN_FLIGHT.inc(count)
        try:
            yield
        finally:
            self._queued_images -= count
            metrics.IMAGES_IN_FLIGHT.dec(count)

    def _active_version(self, name: str) -> int | None:
        status = self._status.get(name)
        return status.active_version if status else None

    def _missing(self, name: str) -> GraftError:
        status = self._status.get(name)
        if status is None:
            return ModelNotFound(f"model {name!r} does not exist in the repository")
        return NotReady(f"model {name!r} has no loaded version yet; retry shortly")

    # -- management ----------------------------------------------------------------------------

    def authorize(self, authorization: str | None) -> None:
        """Check `Authorization: Bearer <token>` for the management API (constant time)."""
        token = self._settings.admin_token
        if token is None:
            raise ManagementDisabled(
                "the management API is off; set GRAFT_ADMIN_TOKEN on the server to enable it"
            )
        scheme, _, presented = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not presented:
            raise Unauthorized("send `Authorization: Bearer <GRAFT_ADMIN_TOKEN>`")
        if not hmac.compare_digest(presented.strip().encode(), token.get_secret_value().encode()):
            raise Unauthorized("the bearer token is wrong")

    async def set_pin(self, model: str, version: int | None) -> None:
        """Pin `model` to `version` (rollback = pin an older one), or follow the newest (None)."""
        name = validate_name(model)
        if version is not None:
            self._repository.resolve(name, version)  # ModelNotFound for a missing version
        elif not self._repository.versions(name):
            raise ModelNotFound(f"model {name!r} does not exist in the repository")
        self._repository.set_pin(name, version)
        await self._call(self._backend.refresh(), None)

    async def push(self, model: str, upload: BinaryIO) -> int:
        """Check a tar.gz export through every push gate, publish it, return its version.

        The archive and manifest gates run here; the TensorFlow gate (load, signatures,
        warm-up) runs in the inference process, which already has TensorFlow.
        """
        name = validate_name(model)
        loop = asyncio.get_running_loop()

        def check_model(folder: Path, model_name: str) -> None:  # called in a worker thread
            check = self._push_call(self._backend.check_export(str(folder), model_name))
            asyncio.run_coroutine_threadsafe(check, loop).result()

        version = await asyncio.to_thread(
            receive_push,
            upload,
            name=name,
            repository=self._repository,
            limits=PushLimits.from_settings(self._settings),
            check_model=check_model,
        )
        await self._push_call(self._backend.refresh())
        return version

    async def _push_call(self, work: Awaitable[T]) -> T:
        """A push's backend call, under GRAFT_PUSH_CHECK_TIMEOUT_S instead of the request
        deadline: loading and warming up a big model can take minutes."""
        timeout_s = self._settings.push_check_timeout_s
        try:
            return await self._call(work, time.monotonic() + timeout_s)
        except DeadlineExceeded:
            raise DeadlineExceeded(
                f"the push's model check did not finish within {timeout_s:g} s; raise "
                "GRAFT_PUSH_CHECK_TIMEOUT_S if the model really is that slow to load"
            ) from None

    # -- metrics -------------------------------------------------------------------------------

    @contextmanager
    def observe(
        self, protocol: str, route: str, model: str = "", version: int | None = None
    ) -> Iterator[dict[str, str]]:
        """Record one request's duration and outcome (and its rejection reason, if any)."""
        outcome = {"version": "" if version is None else str(version)}
        started = time.perf_counter()
        code = "200" if protocol != "grpc" else "OK"
        try:
            yield outcome
        except GraftError as exc:
            code = _status_code(protocol, exc)
            metrics.REQUESTS_REJECTED.labels(exc.code).inc()
            raise
        except BaseException:
            code = "500" if protocol != "grpc" else "INTERNAL"
            raise
        finally:
            metrics.REQUEST_DURATION.labels(
                protocol, route, model, outcome["version"], code
            ).observe(time.perf_counter() - started)

    def rejected(self, protocol: str, route: str, exc: GraftError) -> None:
        """Count a request refused before it reached the gateway (e.g. unparseable)."""
        metrics.REQUESTS_REJECTED.labels(exc.code).inc()
        code = _status_code(protocol, exc)
        metrics.REQUEST_DURATION.labels(protocol, route, "", "", code).observe(0)


def _status_code(protocol: str, exc: GraftError) -> str:
    return exc.grpc_status.name if protocol == "grpc" else str(exc.http_status)


def _image_result(row: np.ndarray, labels: list[str], k: int) -> ImageResult:
    order = np.argsort(-row, kind="stable")[:k]
    top = [TopClass(label=labels[i], score=float(row[i])) for i in order]
    return ImageResult(label=top[0].label, score=top[0].score, top_k=top)


def _raise_first_error(results: list[InferResult]) -> None:
    for index, result in enumerate(results):
        if result.error_code is not None:
            message = result.error or "inference failed"
            error = error_from_code(result.error_code, message)
            if len(results) > 1 and error.http_status == 400:
                error = error_from_code(result.error_code, f"image {index}: {message}")
            raise error


def error_from_code(code: str, message: str) -> GraftError:
    """Rebuild the GraftError subclass named by `code` (errors cross processes as data)."""
    pending: list[type[GraftError]] = [GraftError]
    while pending:
        cls = pending.pop()
        if cls.code == code:
            return cls(message)
        pending.extend(cls.__subclasses__())
    return GraftError(message)


def _transport_error(exc: Exception) -> GraftError:
    """The inference service refused or failed a call: 503 when it is overloaded or down."""
    status = getattr(getattr(exc, "error_code", None), "value", None)
    if status == 503:
        return Overloaded("the inference service is overloaded; retry after a second")
    if isinstance(exc, ConnectionError | OSError):
        return Overloaded(f"the inference service is unreachable ({exc}); retry shortly")
    logger.exception("inference call failed", exc_info=exc)
    return GraftError("inference failed unexpectedly; see the server log")

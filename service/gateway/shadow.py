"""Shadow traffic: a sample of the stable version's requests also run on another version, off
the request path, to compare the two on live images.

A sampled request leaves its images in a bounded queue (GRAFT_SHADOW_QUEUE images) while it is
admitted; a sample that does not fit is dropped and counted (`queue_full`), never waited for.
One worker task takes the samples in order: once the caller has its answer, the images go to
the inference side as background items, which its batcher runs only while no caller's image
waits and no batch runs (service.runtime.batcher); a sample still waiting there at its
deadline (GRAFT_REQUEST_TIMEOUT_S) is dropped (`busy`). So shadow work never holds a place in
the admission queue, never shares or precedes a caller's batch, and never answers a caller.
The shadow's own failures are counted, never raised. The worker sends one sample at a time.

Figures per model and shadow version: images compared, how many had the same top-1 label on
both versions, the mean top-1 confidence of each, errors and drops; the agreement over the
last `window_s` seconds feeds the canary's judgement when the canary is the same version.
"""

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from service import metrics
from service.errors import DeadlineExceeded, GraftError, ModelNotFound, NotReady, error_from_code
from service.gateway.backend_calls import call_backend
from service.gateway.rollback import Window
from service.policy import ShadowFigures, ShadowPolicy
from service.wire import InferenceBackend, InferItem, InferResult

logger = logging.getLogger("graft.shadow")
_NOT_SERVED = frozenset({ModelNotFound.code, NotReady.code})  # the version, not an image

Labels = Callable[[str, int], Awaitable[list[str]]]  # (model, version) -> its labels
Answer = list[tuple[str, float]]  # the stable version's top-1 label and score per image
AGREEMENT_WINDOW_S = 3600.0  # the longest canary window the agreement is asked for


@dataclass
class Sample:
    model: str
    version: int  # the shadow version
    images: list[bytes]
    answer: "asyncio.Future[Answer | None]"

    def cancel(self) -> None:
        """The caller's request failed: nothing to compare with."""
        if not self.answer.done():
            self.answer.set_result(None)

    def answered(self, stable: Answer) -> None:
        if not self.answer.done():
            self.answer.set_result(stable)


@dataclass
class _Figures:
    """One model's shadow figures for one shadow version (reset when the version changes)."""

    version: int
    compared: int = 0
    agreed: int = 0
    confidence_sum: float = 0.0
    stable_confidence_sum: float = 0.0
    errors: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    agreement: Window = field(default_factory=Window)  # 1.0 = same top-1, per image


class ShadowRunner:
    def __init__(
        self,
        backend: InferenceBackend,
        labels: Labels,
        *,
        queue_images: int,
        timeout_s: float,
    ) -> None:
        self._backend = backend
        self._labels = labels
        self._capacity = queue_images
        self._timeout_s = timeout_s
        self._queue: deque[Sample] = deque()
        self._queued_images = 0
        self._ready = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None
        self._figures: dict[str, _Figures] = {}

    def offer(self, model: str, shadow: ShadowPolicy, images: list[bytes]) -> Sample | None:
        """Queue `images` for the shadow version, or drop them (queue full): never waits."""
        if self._queued_images + len(images) > self._capacity:
            self.drop(model, shadow.version, "queue_full")
            return None
        sample = Sample(model, shadow.version, images, asyncio.get_running_loop().create_future())
        self._queue.append(sample)
        self._queued_images += len(images)
        self._ready.set()
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._run(), name="graft-shadow")
        return sample

    def drop(self, model: str, version: int, reason: str) -> None:
        figures = self._figures_of(model, version)
        figures.dropped[reason] = figures.dropped.get(reason, 0) + 1
        metrics.SHADOW_DROPPED.labels(model, reason).inc()

    def agreement(self, model: str, version: int, window_s: float) -> tuple[int, float] | None:
        """(images compared, share with the same top-1) over the last `window_s` seconds."""
        figures = self._figures.get(model)
        if figures is None or figures.version != version:
            return None
        figures.agreement.prune(min(window_s, AGREEMENT_WINDOW_S), time.monotonic())
        mean = figures.agreement.mean()
        return None if mean is None else (figures.agreement.count, mean)

    def figures(self, model: str, shadow: ShadowPolicy) -> ShadowFigures:
        mine = self._figures.get(model)
        if mine is None or mine.version != shadow.version:
            return ShadowFigures(version=shadow.version, rate=shadow.rate)
        compared = mine.compared
        return ShadowFigures(
            version=shadow.version,
            rate=shadow.rate,
            compared=compared,
            agreement=mine.agreed / compared if compared else None,
            mean_confidence=mine.confidence_sum / compared if compared else None,
            stable_mean_confidence=mine.stable_confidence_sum / compared if compared else None,
            errors=mine.errors,
            dropped=dict(mine.dropped),
        )

    def _figures_of(self, model: str, version: int) -> _Figures:
        figures = self._figures.get(model)
        if figures is None or figures.version != version:
            figures = self._figures[model] = _Figures(version)
        return figures

    async def _run(self) -> None:
        while True:
            while not self._queue:
                self._ready.clear()
                await self._ready.wait()
            sample = self._queue[0]
            try:
                await self._handle(sample)
            except Exception:  # shadow work must never take the worker down
                logger.exception("a shadow comparison failed")
            finally:
                self._queue.popleft()
                self._queued_images -= len(sample.images)

    async def _handle(self, sample: Sample) -> None:
        try:
            stable = await asyncio.wait_for(asyncio.shield(sample.answer), self._timeout_s)
        except TimeoutError:
            stable = None
        if stable is None:
            self.drop(sample.model, sample.version, "caller_failed")
            return
        now = time.time()
        items = [
            InferItem(model=sample.model, version=sample.version, image=image, enqueued_at=now,
                      protocol="shadow", background=True)
            for image in sample.images
        ]  # fmt: skip
        deadline = time.monotonic() + self._timeout_s
        try:
            results = await call_backend(self._backend.infer(items), deadline)
            _raise_if_not_served(results)
            labels = await call_backend(self._labels(sample.model, sample.version), deadline)
        except GraftError as exc:
            logger.info("shadow version %s of %s not run: %s", sample.version, sample.model, exc)
            # Past the deadline: callers kept the inference side busy all that time.
            reason = "busy" if isinstance(exc, DeadlineExceeded) else "unavailable"
            self.drop(sample.model, sample.version, reason)
            return
        self._compare(sample, stable, results, labels)

    def _compare(
        self, sample: Sample, stable: Answer, results: list[InferResult], labels: list[str]
    ) -> None:
        figures = self._figures_of(sample.model, sample.version)
        version, now = str(sample.version), time.monotonic()
        for (stable_label, stable_score), result in zip(stable, results, strict=True):
            if result.error_code is not None:
                figures.errors += 1
                metrics.SHADOW_COMPARISONS.labels(sample.model, version, "error").inc()
                continue
            row = result.array()
            top = int(row.argmax())
            agreed = top < len(labels) and labels[top] == stable_label
            figures.compared += 1
            figures.agreed += int(agreed)
            figures.confidence_sum += float(row[top])
            figures.stable_confidence_sum += stable_score
            figures.agreement.add(1.0 if agreed else 0.0, now)
            outcome = "agree" if agreed else "disagree"
            metrics.SHADOW_COMPARISONS.labels(sample.model, version, outcome).inc()
            metrics.SHADOW_CONFIDENCE.labels(sample.model, version, "shadow").observe(row[top])
            metrics.SHADOW_CONFIDENCE.labels(sample.model, version, "stable").observe(stable_score)


def _raise_if_not_served(results: list[InferResult]) -> None:
    """The version not loaded (yet: a policy that has just named it waits for its load) is
    the sample's failure to run, like a backend call's, not the version's failure on an
    image: it must not count among the version's errors."""
    for result in results:
        if result.error_code in _NOT_SERVED:
            raise error_from_code(result.error_code, result.error or "")

"""How one inference batch is run.

A batch mixes items from many requests (HTTP and gRPC alike), possibly for different models and
versions. Items are grouped by (model, version, explain?) and each group is one call of the
SavedModel's `serving_default` on the encoded bytes (explained items: of its `explain`
signature, which also returns the Grad-CAM heatmaps). If a group fails to decode, it is split
in halves until the bad images are alone, so a single bad image fails only its own item (and
so its own request), never the batch. A group that runs the device out of memory (a GPU) is
split the same way: smaller batches are retried, and only an image that cannot run alone gets
a 503.
"""

import math
import time
from collections import defaultdict
from typing import cast

import numpy as np

from service import metrics
from service.errors import (
    BadModelOutput,
    DeviceOutOfMemory,
    ExplanationsUnavailable,
    GraftError,
    InvalidImage,
)
from service.runtime import ood_rate
from service.runtime.loaded_model import LoadedModel
from service.runtime.versions import VersionManager
from service.schemas import UNKNOWN_LABEL
from service.wire import InferItem, InferResult, ModelMetadata


def metadata_of(model: LoadedModel) -> ModelMetadata:
    return ModelMetadata(
        name=model.name,
        version=model.version,
        labels=model.labels,
        image_size=model.image_size,
        signatures=model.signatures,
        runtime=model.runtime,
        device=model.device,
    )


def run_batch(manager: VersionManager, items: list[InferItem]) -> list[InferResult]:
    """Results for `items`, in order; never raises for a problem with one item."""
    started = time.time()
    for item in items:
        metrics.QUEUE_WAIT.observe(max(0.0, started - item.enqueued_at))
    metrics.BATCHES.labels("+".join(sorted({item.protocol for item in items}))).inc()
    results: list[InferResult | None] = [None] * len(items)
    groups: dict[tuple[str, int | None, bool], list[int]] = defaultdict(list)
    for index, item in enumerate(items):
        groups[(item.model, item.version, item.explain)].append(index)
    for (name, version, _), indices in groups.items():
        try:
            model = manager.get(name, version)
        except GraftError as exc:
            for index in indices:
                results[index] = _failure(name, version, exc)
            continue
        group = _run_group(model, [items[i] for i in indices])
        for index, result in zip(indices, group, strict=True):
            results[index] = result
    assert all(r is not None for r in results)  # every index belongs to exactly one group
    return cast(list[InferResult], results)


def _run_group(model: LoadedModel, items: list[InferItem]) -> list[InferResult]:
    """One model call for `items`. When an image fails to decode, the group is split in halves
    and each half runs again: a bad image costs about 2 log2(n) extra calls, not n."""
    started = time.perf_counter()
    images = [item.image for item in items]
    heatmaps: np.ndarray | list[None]
    ood: list[tuple[float, bool] | None] = [None] * len(items)
    try:
        if items[0].explain:  # a group is all explained or all not
            outputs, heatmaps = model.explain(images)
        else:
            outputs, heatmaps = model.infer(images), [None] * len(items)
        probabilities = outputs.probabilities
        if outputs.ood_score is not None and outputs.in_distribution is not None:
            scores, flags = outputs.ood_score.tolist(), outputs.in_distribution.tolist()
            ood = list(zip(scores, flags, strict=True))
    except Exception as exc:
        failure = _item_failure(model, exc)
        if len(items) == 1 or isinstance(failure, ExplanationsUnavailable):  # all: no split
            return [_failure(model.name, model.version, failure) for _ in items]
        half = len(items) // 2
        return _run_group(model, items[:half]) + _run_group(model, items[half:])
    version = str(model.version)
    metrics.BATCH_SIZE.labels(model.name, version).observe(len(items))
    metrics.INFERENCE_DURATION.labels(model.name, version).observe(time.perf_counter() - started)
    rows = zip(probabilities, heatmaps, items, ood, strict=True)
    return [_success(model, row, heatmap, item, flag) for row, heatmap, item, flag in rows]


def _item_failure(model: LoadedModel, exc: Exception) -> GraftError:
    """What a failed call means for its images; anything else is no single image's fault."""
    if isinstance(exc, InvalidImage | ExplanationsUnavailable):
        return exc
    if _out_of_memory(exc):
        metrics.OUT_OF_MEMORY.labels(model.name, str(model.version)).inc()
        return DeviceOutOfMemory(
            f"model {model.name!r} version {model.version} ran {model.device} out of memory "
            "on this image alone; retry later, or send smaller images"
        )
    raise exc


def _out_of_memory(exc: Exception) -> bool:
    """TensorFlow's ResourceExhaustedError, or ONNX Runtime's / CUDA's allocation failures."""
    if type(exc).__name__ == "ResourceExhaustedError":
        return True
    text = str(exc).lower()
    return any(sign in text for sign in ("out of memory", "failed to allocate memory"))


def _success(
    model: LoadedModel,
    row: np.ndarray,
    heatmap: np.ndarray | None,
    item: InferItem | None = None,
    ood: tuple[float, bool] | None = None,
) -> InferResult:
    """One image's result; `ood` its (ood_score, in_distribution) where the version has them."""
    finite = np.isfinite(row).all() and (ood is None or math.isfinite(ood[0]))
    if not finite or (heatmap is not None and not np.isfinite(heatmap).all()):
        return _failure(model.name, model.version, _bad_output(model))
    top = int(np.argmax(row))
    version = str(model.version)
    label = model.labels[top]
    if ood is not None:
        ood_rate.record(model.name, version, ood[1])
        if not ood[1] and item is not None and item.reject_unknown:
            label = UNKNOWN_LABEL  # what the gateway answers for it
    metrics.PREDICTIONS.labels(model.name, version, label).inc()
    metrics.CONFIDENCE.labels(model.name, version).observe(float(row[top]))
    return InferResult(
        model=model.name,
        version=model.version,
        probabilities=row.astype(np.float32).tobytes(),
        heatmap=None if heatmap is None else heatmap.astype(np.float32).tobytes(),
        ood_score=None if ood is None else ood[0],
        in_distribution=None if ood is None else ood[1],
    )


def _failure(name: str, version: int | None, exc: GraftError) -> InferResult:
    return InferResult(model=name, version=version, error_code=exc.code, error=exc.message)


def _bad_output(model: LoadedModel) -> BadModelOutput:
    return BadModelOutput(
        f"model {model.name!r} version {model.version} returned NaN or infinite probabilities "
        f"for this image; the version is broken for such inputs: pin an earlier one with "
        f"PUT /models/{model.name}/policy, and retrain or re-export it"
    )

"""graft's Prometheus metrics (prefix `graft_`), correct with several worker processes.

BentoML starts every worker with PROMETHEUS_MULTIPROC_DIR set, and prometheus_client picks its
value storage when it is first imported: in a worker these metrics therefore live in per-process
files that BentoML's `/metrics` route merges (entry and inference processes alike). Outside a
server (unit tests, the CLI) they are ordinary in-process metrics.
"""

from prometheus_client import Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)

REQUEST_DURATION = Histogram(
    "graft_request_duration_seconds",
    "Time to answer one request, from receipt to response.",
    ["protocol", "route", "model", "version", "code"],
    buckets=_LATENCY_BUCKETS,
)
BATCH_SIZE = Histogram(
    "graft_inference_batch_size",
    "Images per inference batch (adaptive batching).",
    ["model", "version"],
    buckets=_BATCH_BUCKETS,
)
BATCHES = Counter(
    "graft_inference_batches_total",
    "Inference batches by the protocols whose requests they merged (e.g. grpc+http).",
    ["protocols"],
)
INFERENCE_DURATION = Histogram(
    "graft_inference_duration_seconds",
    "Compute time of one inference batch (decode + model).",
    ["model", "version"],
    buckets=_LATENCY_BUCKETS,
)
QUEUE_WAIT = Histogram(
    "graft_queue_wait_seconds",
    "Time an image waited between the gateway and the start of its batch.",
    buckets=_LATENCY_BUCKETS,
)
PREDICTIONS = Counter(
    "graft_predictions_total",
    "Predictions by top-1 label.",
    ["model", "version", "label"],
)
CONFIDENCE = Histogram(
    "graft_prediction_confidence",
    "Top-1 probability of each prediction; a shift to the left is a drift signal.",
    ["model", "version"],
    buckets=_CONFIDENCE_BUCKETS,
)
ACTIVE_VERSION = Gauge(
    "graft_model_active_version",
    "The version that answers requests naming no version.",
    ["model"],
    multiprocess_mode="livemostrecent",
)
IMAGES_IN_FLIGHT = Gauge(
    "graft_images_in_flight",
    "Images admitted by the gateway and not answered yet (bounded by GRAFT_MAX_QUEUE).",
    multiprocess_mode="livesum",
)
MODEL_LOADS = Counter(
    "graft_model_loads_total",
    "Model version loads by outcome (loaded / failed).",
    ["model", "outcome"],
)
MODEL_LOAD_DURATION = Histogram(
    "graft_model_load_duration_seconds",
    "Time to load, verify and warm up one model version.",
    ["model"],
    buckets=(0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
MODEL_RUNTIME = Gauge(
    "graft_model_runtime",
    "1 for each loaded version, labelled with the runtime and the device that run its network.",
    ["model", "version", "runtime", "device"],
    multiprocess_mode="livemax",
)
RUNTIME_FALLBACKS = Counter(
    "graft_runtime_fallbacks_total",
    "Versions loaded on TensorFlow although an accelerated runtime was asked for (see the "
    "runtime_note in GET /models).",
    ["model", "runtime"],
)
OUT_OF_MEMORY = Counter(
    "graft_device_out_of_memory_total",
    "Inference calls that ran the device out of memory (the batch is then split and retried).",
    ["model", "version"],
)
REQUESTS_REJECTED = Counter(
    "graft_requests_rejected_total",
    "Requests refused before or during inference, by reason (the error code).",
    ["reason"],
)
# -- canary and shadow (service/gateway/trials.py); versions are ones the repository holds ----
SPLIT_REQUESTS = Counter(
    "graft_split_requests_total",
    "Requests naming no version, by the version the canary split sent them to (arm: stable or "
    "canary).",
    ["model", "version", "arm"],
)
CANARY_RETRIES = Counter(
    "graft_canary_retries_total",
    "Canary requests the canary version failed, answered by the stable version instead.",
    ["model", "version"],
)
CANARY_DECISIONS = Counter(
    "graft_canary_decisions_total",
    "Canaries withdrawn or promoted automatically (the reason is in GET /models); "
    "withdrawn_locally: policy.json could not be written (a read-only model volume), so only "
    "the replica that judged it stopped routing to it.",
    ["model", "version", "decision"],
)
SHADOW_COMPARISONS = Counter(
    "graft_shadow_comparisons_total",
    "Images run on the shadow version, by whether its top-1 label agreed with the stable "
    "version's (agree / disagree), or `error` when the shadow version failed them.",
    ["model", "version", "outcome"],
)
SHADOW_CONFIDENCE = Histogram(
    "graft_shadow_confidence",
    "Top-1 probability of each shadowed image, on the stable and on the shadow version "
    "(role): the means are _sum / _count.",
    ["model", "version", "role"],
    buckets=_CONFIDENCE_BUCKETS,
)
SHADOW_DROPPED = Counter(
    "graft_shadow_dropped_total",
    "Shadow samples never run, by reason: queue_full (GRAFT_SHADOW_QUEUE), busy (callers' "
    "images kept inference busy until its deadline), caller_failed, unavailable (the shadow "
    "version is not loaded).",
    ["model", "reason"],
)
PROMOTION_STATE = Gauge(
    "graft_model_promotion",
    "1 for the promotion state each version is in (candidate / promoted / rejected), else 0.",
    ["model", "version", "state"],
    multiprocess_mode="livemax",
)
PROMOTIONS = Counter(
    "graft_promotions_total",
    "Promotion gate decisions this replica saw recorded, by outcome (promoted / rejected).",
    ["model", "outcome"],
)
# -- the out-of-distribution flag (versions trained with it; service/runtime/ood_rate.py) -----
OUT_OF_DISTRIBUTION = Counter(
    "graft_out_of_distribution_total",
    "Images a version flagged out of distribution (in_distribution false); divided by "
    "graft_predictions_total of the same version, the share of inputs unlike the training data.",
    ["model", "version"],
)
OOD_RATE = Gauge(
    "graft_ood_rate",
    "Share of a version's last 1000 images flagged out of distribution (about 0.01 on images "
    "like its validation images, by its threshold): the input-drift signal.",
    ["model", "version"],
    multiprocess_mode="livemax",
)

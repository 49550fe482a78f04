"""Every serving setting, from `graft serve` flags or `GRAFT_*` environment variables."""

from pathlib import Path

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.units import MiB

MIN_ADMIN_TOKEN_CHARS = 16  # a guessable token is no boundary for pushing code


class GraftSettings(BaseSettings):
    """Serving configuration. Each field `x` is also read from the variable `GRAFT_X`."""

    model_config = SettingsConfigDict(env_prefix="GRAFT_", extra="ignore")

    model_root: Path = Field(Path("models"), description="Model repository (TF Serving layout).")
    default_model: str = Field("imagenet", description="Model used when a request names none.")
    model_name: str | None = Field(
        None,
        description="Single-model mode (KServe): model_root is ONE model's folder (its version "
        "folders, or one version's files), served under this name, which is the default model.",
    )
    host: str = "127.0.0.1"
    port: int = Field(3000, ge=1, le=65535)
    grpc_port: int = Field(50051, ge=0, le=65535, description="0 turns the gRPC server off.")
    workers: int = Field(1, ge=1, description="HTTP worker processes of the entry service.")
    separate_inference: bool = Field(
        False,
        description="Run the models in an inference process of their own even with one worker "
        "(more than one worker always does); otherwise one worker serves and owns the models.",
    )
    admin_token: SecretStr | None = Field(
        None, description="Bearer token for the management API; unset turns management off."
    )
    poll_interval_s: float = Field(2.0, gt=0, description="How often the repository is polled.")
    state_dir: Path | None = Field(
        None,
        description="Where the serving process records its model loads, so that a version "
        "that failed to load, or crashed the process loading it, stays FAILED across restarts. "
        "Unset: MODEL_ROOT/.state/<hostname>. Set it when the model volume is read-only.",
    )
    max_batch_size: int = Field(
        8, ge=1, description="Adaptive batching: most images per model call; 1 turns it off."
    )
    batch_timeout_ms: float = Field(
        0.0,
        ge=0,
        description="Adaptive batching: how long a free batch thread waits for a fuller batch.",
    )
    batch_threads: int = Field(
        1,
        ge=1,
        description="Batches that run at the same time. Each gets the cores divided by this "
        "number as its runtime threads (GRAFT_RUNTIME_THREADS), so on a small CPU one batch "
        "at a time with every core is the fastest at any load.",
    )
    max_batch_pixels: int = Field(
        40_000_000,
        ge=1,
        le=10_000_000_000,
        description="Adaptive batching: a batch is closed before the image that would take its "
        "decoded pixels over this (an image over it runs alone), bounding one batch's decode "
        "memory (3 bytes a pixel, then the resize).",
    )
    heavy_image_pixels: int = Field(
        4_000_000,
        ge=0,
        le=10_000_000_000,
        description="Images of at least this many pixels are decoded in a lane of their own "
        "(one batch at a time, on a thread of its own), so that cheap images never queue behind "
        "them; 0 turns the lane off.",
    )
    runtime: str = Field(
        "auto",
        max_length=32,
        description="What runs the network: auto|onnxruntime|openvino|tensorflow. auto = ONNX "
        "Runtime when installed (a version without its ONNX file runs on TensorFlow); a named "
        "runtime must be installed or `graft serve` refuses to start.",
    )
    device: str = Field(
        "auto",
        max_length=16,
        description="Where the network runs: auto (the first visible NVIDIA GPU, else the CPU), "
        "cpu, gpu or gpu:N; a GPU that is not there stops `graft serve`.",
    )
    decode_threads: str = Field(
        "auto",
        description="Threads that decode a batch's images in parallel (each one a call of the "
        "version's own `preprocess` signature) on an accelerated runtime: auto (every core on a "
        "GPU, 1 on the CPU) or a number; 1 decodes a batch in one call.",
    )
    runtime_threads: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="Threads per network call on an accelerated runtime; unset: the cores "
        "divided by GRAFT_BATCH_THREADS, so concurrent batches do not oversubscribe them.",
    )
    max_body_bytes: int = Field(16 * MiB, ge=1, description="Larger request bodies get 413.")
    max_images_per_request: int = Field(64, ge=1)
    max_image_pixels: int = Field(
        40_000_000, ge=1, description="Read from the image header; larger images are refused."
    )
    max_request_pixels: int = Field(
        160_000_000,
        ge=1,
        description="Pixels of all the images of one request together (413 beyond).",
    )
    max_reencoded_pixels: int = Field(
        16_000_000,
        ge=1,
        le=1_000_000_000,
        description="Pixels of one request that the entry re-encodes (EXIF-rotated JPEGs, BMPs "
        "TensorFlow cannot decode), counted from the headers before any is decoded; each costs "
        "3 bytes in the entry (about 12 in the separate layout, with its copies to the inference "
        "process); 413 beyond. A rotated 12 MP phone photo re-encodes 3 MP (half-scale decode).",
    )
    request_timeout_s: float = Field(30.0, gt=0, description="Per-request deadline (504).")
    push_check_timeout_s: float = Field(
        300.0,
        gt=0,
        description="How long a push's model check (load + warm-up) and reload may take (504).",
    )
    max_queue: int = Field(
        256, ge=1, description="Images waiting for inference before new requests get 503."
    )
    shadow_queue: int = Field(
        64,
        ge=1,
        le=100_000,
        description="Images of sampled requests waiting to be run on a policy's shadow version; "
        "samples beyond it are dropped (counted), never delayed: shadow work is off the request "
        "path, and runs only while no caller's image waits for inference.",
    )
    grpc_max_message_bytes: int = Field(32 * MiB, ge=1)
    max_concurrent_requests: int = Field(
        128,
        ge=1,
        description="HTTP requests one entry worker serves at once (/livez, /readyz, /healthz "
        "and /metrics aside); more get 503 with Retry-After.",
    )
    max_body_bytes_in_flight: int = Field(
        256 * MiB,
        ge=1,
        description="Request bodies one entry worker accepts at once, by Content-Length (the "
        "body limit when there is none); more get 503 with Retry-After. Bounds the memory and "
        "the /tmp spool that uploads being received take. Pushes (token checked before their "
        "body is read) are not counted.",
    )
    header_timeout_s: float = Field(
        10.0,
        gt=0,
        le=3600,
        description="A connection must complete a request's line and headers within this "
        "long of opening, or of its previous answer; it is closed otherwise (slowloris).",
    )
    body_timeout_s: float = Field(
        60.0,
        gt=0,
        le=3600,
        description="A request body must arrive within this long of its headers (408, and the "
        "connection is closed); pushes get GRAFT_PUSH_BODY_TIMEOUT_S.",
    )
    push_body_timeout_s: float = Field(
        300.0, gt=0, le=3600, description="How long a push's body may take to arrive (408)."
    )
    grpc_max_concurrent_rpcs: int = Field(
        128, ge=1, description="gRPC calls served at once; more get RESOURCE_EXHAUSTED."
    )
    grpc_max_streams_per_connection: int = Field(
        100,
        ge=1,
        description="Concurrent HTTP/2 streams (calls) one gRPC connection may open; grpcio's "
        "client refuses calls beyond it with UNAVAILABLE instead of queueing them, so keep it "
        "at least the calls one client multiplexes (RFC 9113 recommends no less than 100).",
    )
    grpc_max_connection_idle_s: float = Field(
        300.0, gt=0, description="A gRPC connection with no call for this long is closed."
    )
    max_push_bytes: int = Field(512 * MiB, ge=1, description="Largest model upload (tar.gz).")
    max_push_uncompressed_bytes: int = Field(
        2048 * MiB, ge=1, description="Largest total size a model upload may unpack to."
    )
    max_push_members: int = Field(64, ge=1, description="Most files a model upload may hold.")
    shutdown_drain_s: float = Field(
        3.0,
        ge=0,
        description="On SIGTERM, how long /readyz answers 503 before the server stops "
        "(so load balancers stop routing first); in-flight requests then finish.",
    )
    access_log: bool = Field(
        False,
        description="BentoML's access log: one line per HTTP request, written on the serving "
        "event loop. graft_request_duration_seconds counts the same requests.",
    )

    @model_validator(mode="after")
    def _single_model_is_the_default(self) -> "GraftSettings":
        if self.model_name is None:
            return self
        if "default_model" in self.model_fields_set and self.default_model != self.model_name:
            raise ValueError(
                f"GRAFT_DEFAULT_MODEL ({self.default_model}) is not GRAFT_MODEL_NAME "
                f"({self.model_name}): in single-model mode the one model is the default; "
                "unset GRAFT_DEFAULT_MODEL (--default-model)"
            )
        self.default_model = self.model_name
        return self

    @field_validator("admin_token")
    @classmethod
    def _token_long_enough(cls, token: SecretStr | None) -> SecretStr | None:
        if token is None or token.get_secret_value() == "":
            return None  # an empty GRAFT_ADMIN_TOKEN is unset: management stays off
        if len(token.get_secret_value()) < MIN_ADMIN_TOKEN_CHARS:
            raise ValueError(
                f"GRAFT_ADMIN_TOKEN has {len(token.get_secret_value())} characters; use at least "
                f"{MIN_ADMIN_TOKEN_CHARS} random ones, e.g. `openssl rand -hex 16`"
            )
        return token

    @model_validator(mode="after")
    def _bodies_fit_in_flight(self) -> "GraftSettings":
        # A body the size of the limit could never be admitted: it would get 503 for ever.
        if self.max_body_bytes > self.max_body_bytes_in_flight:
            raise ValueError(
                f"GRAFT_MAX_BODY_BYTES ({self.max_body_bytes}) is over "
                f"GRAFT_MAX_BODY_BYTES_IN_FLIGHT ({self.max_body_bytes_in_flight}), so the "
                "largest allowed body could never be accepted; raise the second or lower the first"
            )
        return self

    @model_validator(mode="after")
    def _requests_fit_the_queue(self) -> "GraftSettings":
        # A request larger than the queue could never be admitted: it would get 503 for ever.
        if self.max_images_per_request > self.max_queue:
            raise ValueError(
                f"GRAFT_MAX_IMAGES_PER_REQUEST ({self.max_images_per_request}) is over "
                f"GRAFT_MAX_QUEUE ({self.max_queue}), so the largest allowed request could never "
                "be queued; raise GRAFT_MAX_QUEUE or lower GRAFT_MAX_IMAGES_PER_REQUEST"
            )
        return self

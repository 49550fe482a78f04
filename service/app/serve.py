"""`graft serve`: serve every model in a repository over HTTP (and gRPC) with BentoML."""

import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from pydantic import SecretStr, ValidationError

from service.errors import GraftError
from service.settings import GraftSettings
from service.store.repository import ModelRepository
from service.store.single_model import open_repository

DefaultInstaller = Callable[[ModelRepository], int]


def register(app: typer.Typer, install_default: DefaultInstaller) -> None:
    """Add `graft serve`; an empty repository first gets the model `install_default` publishes
    (the training side provides it: serving code does not import training)."""

    def serve(
        model_root: Annotated[
            Path | None,
            typer.Option(help="Model repository (TF Serving layout). [GRAFT_MODEL_ROOT]"),
        ] = None,
        host: Annotated[str | None, typer.Option(help="Address to listen on. [GRAFT_HOST]")] = None,
        port: Annotated[int | None, typer.Option(help="HTTP port. [GRAFT_PORT]")] = None,
        grpc_port: Annotated[
            int | None, typer.Option(help="gRPC port; 0 turns gRPC off. [GRAFT_GRPC_PORT]")
        ] = None,
        default_model: Annotated[
            str | None, typer.Option(help="Model for requests naming none. [GRAFT_DEFAULT_MODEL]")
        ] = None,
        workers: Annotated[
            int | None, typer.Option(help="HTTP worker processes. [GRAFT_WORKERS]")
        ] = None,
        model_name: Annotated[
            str | None,
            typer.Option(
                help="Single-model mode (KServe): --model-root is one model's folder (ROOT/1/, "
                "ROOT/2/, ... or one version's files), served as this name. [GRAFT_MODEL_NAME]"
            ),
        ] = None,
    ) -> None:
        """Serve the models under --model-root; an empty repository gets the ImageNet default.

        With --model-name, serve one model's folder under that name (KServe's /mnt/models).

        Every other setting comes from GRAFT_* environment variables (see the README), e.g.
        GRAFT_ADMIN_TOKEN turns the management API on.
        """
        flags = {
            "model_root": model_root,
            "host": host,
            "port": port,
            "grpc_port": grpc_port,
            "default_model": default_model,
            "workers": workers,
            "model_name": model_name,
        }
        start({k: v for k, v in flags.items() if v is not None}, install_default)

    app.command()(serve)


def start(flags: dict[str, Any], install_default: DefaultInstaller) -> None:
    """Serve with `flags` over the GRAFT_* environment until stopped (SIGTERM drains first)."""
    try:
        settings = GraftSettings(**flags)
    except ValidationError as exc:
        typer.echo(f"error: {_settings_error(exc, flags)}", err=True)
        raise typer.Exit(2) from None
    settings.model_root = settings.model_root.resolve()
    _choose_engine(settings)
    if settings.model_name is None:
        _ensure_a_model(settings, install_default)
    else:
        _check_single_model(settings)
    _export(settings)
    _serve(settings)


def _ensure_a_model(settings: GraftSettings, install_default: DefaultInstaller) -> None:
    repository = ModelRepository(settings.model_root)
    if models := repository.models():
        if settings.default_model not in models:
            typer.echo(
                f"warning: the default model {settings.default_model!r} is not in "
                f"{settings.model_root} (found: {', '.join(models)}); /readyz stays 503 until "
                "it is published. Choose another with --default-model.",
                err=True,
            )
        return
    typer.echo(f"{settings.model_root} holds no model: installing the ImageNet default first")
    version = install_default(repository)
    typer.echo(f"installed model 'imagenet' version {version}")


def _check_single_model(settings: GraftSettings) -> None:
    """Single-model mode serves what was mounted, installs nothing: refuse, in one line, a
    folder it could not serve."""
    root, name = settings.model_root, settings.model_name
    try:
        if open_repository(root, name).models():
            return
        found = ModelRepository(root).models()
    except GraftError as exc:
        _refuse(exc.message)
    hint = (
        f"; it is a repository of the models {', '.join(found)}: point --model-root (KServe: "
        f"the storageUri) at one of them, e.g. {root / found[0]}"
        if found
        else ""
    )
    _refuse(
        f"{root} holds no version of model {name!r}: single-model mode expects version folders "
        f"there ({root}/1/saved_model.pb + graft.json, ...) or one version's files "
        f"(saved_model.pb + graft.json){hint}"
    )


def _choose_engine(settings: GraftSettings) -> None:
    """Refuse, in one line, a GRAFT_RUNTIME or GRAFT_DEVICE this machine cannot honour (before
    any model is installed or any process started); take the device's batching defaults for
    the settings the user left alone, and say what was chosen."""
    from service.runtime.devices import batching_defaults
    from service.runtime.networks import RuntimeUnavailable, engine_for

    try:
        engine = engine_for(settings)
    except RuntimeUnavailable as exc:
        _refuse(str(exc))
    for key, value in batching_defaults(engine.device, settings.model_fields_set).items():
        setattr(settings, key, value)
    accelerated = engine.runtime != "tensorflow"
    threads = f", {engine.threads} threads per call" if accelerated else ""
    plural = "s" if engine.decode_threads != 1 else ""
    decoding = f"; images decoded on {engine.decode_threads} thread{plural}" if accelerated else ""
    typer.echo(
        f"graft: the network runs on {engine.runtime} ({engine.device}{threads}); batches of up "
        f"to {settings.max_batch_size} images, {settings.batch_threads} at once{decoding}",
        err=True,
    )


def _settings_error(exc: ValidationError, flags: dict[str, Any]) -> str:
    """pydantic's first complaint in one line, naming the flag or the GRAFT_ variable it came
    from (never the value: it may be the admin token)."""
    first = exc.errors()[0]
    message = first["msg"].removeprefix("Value error, ")
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    if not first["loc"]:  # a rule over several settings: the message names them
        return message + more
    field = str(first["loc"][0])
    source = f"--{field.replace('_', '-')}" if field in flags else f"GRAFT_{field.upper()}"
    named = message if message.startswith(source) else f"{source}: {message}"
    return named + more


def _refuse(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


def _export(settings: GraftSettings) -> None:
    """Hand the settings to BentoML's worker processes, which inherit the environment."""
    for field, value in settings.model_dump().items():
        key = f"GRAFT_{field.upper()}"
        if value is None:
            os.environ.pop(key, None)
        else:
            secret = value.get_secret_value() if isinstance(value, SecretStr) else value
            os.environ[key] = str(secret)


def _serve(settings: GraftSettings) -> None:
    # A private BentoML home per server: BentoML wipes its Prometheus multiprocess folder on
    # start, and two servers sharing one (tests, a second replica) would corrupt each other's
    # metrics.
    home = tempfile.mkdtemp(prefix="graft-bentoml-")
    os.environ["BENTOML_HOME"] = home
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")
    try:
        from service.app.supervisor import serve_gracefully

        # The BentoML server runs as a child so that SIGTERM drains before the workers stop.
        # Workers import "service.app.entry:Graft" from the cwd; graft is installed, so any
        # cwd works.
        child = [sys.executable, "-m", "service.app.server_process"]
        code = serve_gracefully(child, settings, Path(home) / "draining")
    finally:
        shutil.rmtree(home, ignore_errors=True)
    if code:
        raise typer.Exit(code)

"""`graft serve`: serve every model in a repository over HTTP (and gRPC) with BentoML."""

import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Annotated

import typer
from pydantic import SecretStr, ValidationError

from service.settings import GraftSettings


def serve(
    model_root: Annotated[
        Path | None, typer.Option(help="Model repository (TF Serving layout). [GRAFT_MODEL_ROOT]")
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
) -> None:
    """Serve the models under --model-root; an empty repository gets the ImageNet default.

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
    }
    try:
        settings = GraftSettings(**{k: v for k, v in flags.items() if v is not None})
    except ValidationError as exc:
        raise typer.BadParameter(str(exc)) from None
    settings.model_root = settings.model_root.resolve()
    _ensure_a_model(settings)
    _export(settings)
    _serve(settings)


def _ensure_a_model(settings: GraftSettings) -> None:
    from service.repository import ModelRepository

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
    from training.commands_models import create_default_model

    version = create_default_model(repository)
    typer.echo(f"installed model 'imagenet' version {version}")


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
        from service.shutdown import serve_gracefully

        # The BentoML server runs as a child (`python -m service.shutdown` calls
        # Graft.serve_http) so that SIGTERM drains before the workers stop. Workers import
        # "service.bento:Graft" from the cwd; graft is installed, so any cwd works.
        child = [sys.executable, "-m", "service.shutdown"]
        code = serve_gracefully(child, settings, Path(home) / "draining")
    finally:
        shutil.rmtree(home, ignore_errors=True)
    if code:
        raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    app.command()(serve)

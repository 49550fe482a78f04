"""The `graft` command line. Each command lives beside the code it drives; this module only
assembles them, and heavy imports (TensorFlow, BentoML) happen inside the commands so that
`graft --help` stays instant."""

import typer

from service import __version__
from service.commands import register as _register_serve
from training.commands_models import register as _register_models
from training.commands_train import register as _register_train

app = typer.Typer(
    name="graft",
    help="Turn a folder of labelled images into a served image classifier.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.command()
def version() -> None:
    """Print graft's version."""
    typer.echo(__version__)


_register_serve(app)
_register_train(app)
_register_models(app)

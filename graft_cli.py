"""The `graft` command line, assembled from what each side contributes.

Serving (`service.app.serve`) and training (`training.commands_*`) each register their own
commands; this is the one place that knows both, so neither side imports the other's commands.
Heavy imports (TensorFlow, BentoML) happen inside the commands: `graft --help` stays instant.
"""

import typer

from service import __version__
from service.app import serve
from training import commands_explain, commands_models, commands_train
from training.default_model import create_default_model

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


serve.register(app, install_default=create_default_model)
commands_train.register(app)
commands_models.register(app)
commands_explain.register(app)

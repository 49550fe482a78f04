"""One-line errors for the training side's commands: a failure the user can fix ends the
command with `error: <message>` on stderr and exit status 1, never a traceback."""

from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

import typer

from service.errors import GraftError


def fail(message: str) -> NoReturn:
    """Print `error: <message>` on stderr and end the command with exit status 1."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1) from None


@contextmanager
def one_line_errors(*errors: type[Exception]) -> Iterator[None]:
    """Turn a `GraftError` (its message) or one of `errors` (its text) into `fail(...)`.

    A context manager (`with one_line_errors(ValueError): ...`) that also decorates a whole
    command (`@one_line_errors(OSError, ValueError)`), keeping its signature for typer.
    """
    try:
        yield
    except (GraftError, *errors) as error:
        fail(error.message if isinstance(error, GraftError) else str(error))

"""Parse a container's command line with the real `graft` CLI, running nothing.

    params = parse_graft(["graft", "serve", "--model-root", "/models"])
    assert params["model_root"] == Path("/models")

Used by the deployment tests on every `graft` command their manifests run.
"""

from typing import Any

import pytest
import typer

from graft_cli import app


def parse_graft(argv: list[str]) -> dict[str, Any]:
    """`graft SUBCOMMAND ARGS...` -> the subcommand's parameters; fails the test if it does not
    parse (an unknown flag, a missing value, a command that is not graft's)."""
    assert argv[0] == "graft", f"{argv} does not run graft"
    group = typer.main.get_command(app)
    context = group.make_context("graft", list(argv[1:]))
    command = group.get_command(context, argv[1])
    assert command is not None, f"`graft {argv[1]}` is not a graft command"
    try:
        return command.make_context(f"graft {argv[1]}", list(argv[2:]), parent=context).params
    except Exception as exc:  # typer vendors click: its UsageError is not public API
        pytest.fail(f"`{' '.join(argv)}` does not parse: {exc}")

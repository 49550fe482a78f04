"""The real `graft` CLI in tests: parse a container's command line, running nothing, or run a
command as a user would.

    params = parse_graft(["graft", "serve", "--model-root", "/models"])
    assert params["model_root"] == Path("/models")
    result = run_graft("serve", "--model-root", str(root), env={"GRAFT_DEVICE": "gpu:7"})

The deployment tests parse every `graft` command their manifests run.
"""

import os
import subprocess
import sys
from pathlib import Path
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


def run_graft(
    *args: str, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run the installed `graft ARGS...` with `env` added to this environment; text output."""
    return subprocess.run(
        [str(Path(sys.executable).parent / "graft"), *args],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )

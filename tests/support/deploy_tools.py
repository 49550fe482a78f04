"""What the deployment tests share: finding a tool, running it, reading a Dockerfile's stages."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def find_tool(name: str, how_to_get: str) -> str:
    """The tool's path (the venv's first), or skip the test saying how to get it."""
    path = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if path is None:
        pytest.skip(f"`{name}` is not installed: {how_to_get}")
    return path


def run_ok(*cmd: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """Run `cmd`; fail the test with its output unless it exits 0."""
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=120)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}"
    return result


def dockerfile_stages(dockerfile: str) -> list[list[str]]:
    """Instructions (continuation lines joined) grouped by build stage."""
    joined = re.sub(r"\\\n\s*", " ", dockerfile)
    lines = [ln.strip() for ln in joined.splitlines() if ln.strip() and not ln.startswith("#")]
    stages: list[list[str]] = []
    for line in lines:
        if line.upper().startswith("FROM "):
            stages.append([])
        if stages:
            stages[-1].append(line)
    return stages

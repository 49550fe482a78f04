"""Where and when a figure was measured: machine, commit, command, and how busy the machine
was with work that is not the benchmark's (figures measured under contention are labelled)."""

import os
import platform
import subprocess
import sys
import time
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import psutil

from bench.images import REPO_ROOT

# Above this share of the machine's CPU used by other processes, a run is "under contention".
CONTENTION_THRESHOLD = 0.10


def _cpu_model() -> str:
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        cpuinfo = ""
    for line in cpuinfo.splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _dist(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=False
        ).stdout.strip()

    head = git("rev-parse", "--short=10", "HEAD") or "unknown"
    return f"{head}+dirty" if git("status", "--porcelain", "--untracked-files=no") else head


def machine() -> dict[str, Any]:
    return {
        "host": platform.node(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "tensorflow": _dist("tensorflow"),
        "bentoml": _dist("bentoml"),
        "grpcio": _dist("grpcio"),
    }


def run_meta(quick: bool) -> dict[str, Any]:
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit(),
        "command": " ".join(["python -m bench", *sys.argv[1:]]),
        "quick": quick,
        "machine": machine(),
        "load_average": list(os.getloadavg()),
    }


def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has spent busy (all cores) since boot."""
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + t.irq + t.softirq + getattr(t, "steal", 0.0)


class CpuWindow:
    """Machine-wide busy CPU over a block, to subtract the benchmark's own from."""

    def __enter__(self) -> "CpuWindow":
        self.start_busy, self.start = busy_cpu_seconds(), time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        self.busy = busy_cpu_seconds() - self.start_busy
        self.elapsed = time.monotonic() - self.start

    def foreign_share(self, own_cpu_s: float) -> float:
        """Share of the machine's total CPU capacity used by processes that are not ours."""
        capacity = self.elapsed * (os.cpu_count() or 1)
        return max(self.busy - own_cpu_s, 0.0) / max(capacity, 1e-9)

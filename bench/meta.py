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
        "onnxruntime": _dist("onnxruntime"),
        "openvino": _dist("openvino"),
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


def contention(machine_busy_s: float, own_s: float, span_s: float) -> dict[str, Any]:
    """The contention verdict of one measured span: the share of the machine's CPU capacity
    that processes other than ours used (`machine_busy_s` minus `own_s`, both over exactly
    that span), and whether it passes CONTENTION_THRESHOLD. Every figure must cover the same
    instants: busy CPU counted past the span's end (answers still arriving) while ours stops
    at it reads as somebody else's work on a quiet machine."""
    capacity = max(span_s, 1e-9) * (os.cpu_count() or 1)
    foreign = max(machine_busy_s - own_s, 0.0) / capacity
    return {"foreign_cpu_share": foreign, "contended": foreign > CONTENTION_THRESHOLD}


class CpuWindow:
    """Machine-wide busy CPU and this process's CPU (all its threads) between start() and
    stop(), or over a `with` block, with the instants (time.monotonic()) they cover."""

    def start(self) -> "CpuWindow":
        self.start_busy, self.start_cpu = busy_cpu_seconds(), time.process_time()
        self.start_at = time.monotonic()
        return self

    def stop(self) -> "CpuWindow":
        self.busy = busy_cpu_seconds() - self.start_busy
        self.own_cpu_s = time.process_time() - self.start_cpu
        self.end_at = time.monotonic()
        self.elapsed = self.end_at - self.start_at
        return self

    def __enter__(self) -> "CpuWindow":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def contention(self, others_cpu_s: float = 0.0) -> dict[str, Any]:
        """The verdict with this process and `others_cpu_s` (the benchmark's other processes
        over the same window) counted as ours."""
        return contention(self.busy, self.own_cpu_s + others_cpu_s, self.elapsed)

"""Server processes under test: start, wait until ready, sample memory, stop.

Each server runs in its own process group so that stopping it also stops every worker it
forked (BentoML runs one process per service), and memory is summed over the whole tree.
"""

import bisect
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import httpx
import psutil

READY_TIMEOUT_S = 300.0  # TensorFlow start-up on a busy 2-core machine can take minutes


class ServerFailed(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def tree_pss(procs: list[psutil.Process]) -> int:
    return sum(_rollup(p.pid).get("Pss", 0) for p in procs)


def _rollup(pid: int) -> dict[str, int]:
    """/proc/PID/smaps_rollup in bytes. Reading it costs ~30 ms of CPU on a TensorFlow
    process (the kernel walks its page tables), so PSS is sampled less often than RSS."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        try:
            return {"Rss": psutil.Process(pid).memory_info().rss}
        except psutil.Error:
            return {}
    sizes = {}
    for line in text.splitlines()[1:]:
        key, _, value = line.partition(":")
        parts = value.split()
        if len(parts) == 2 and parts[1] == "kB":
            sizes[key] = int(parts[0]) * 1024
    return sizes


def tree_rss_cpu(procs: list[psutil.Process]) -> tuple[int, float]:
    """(sum of RSS bytes, sum of CPU seconds) over processes; cheap (statm and stat)."""
    rss, cpu = 0, 0.0
    for proc in procs:
        try:
            rss += proc.memory_info().rss
            times = proc.cpu_times()
        except psutil.Error:
            continue
        cpu += times.user + times.system + times.children_user + times.children_system
    return rss, cpu


class TreeSample(NamedTuple):
    t: float  # time.monotonic()
    rss: int  # bytes, summed over the tree
    pss: int  # bytes, summed over the tree (refreshed every `slow_every` samples)
    cpu: float  # CPU seconds used by the tree so far
    harness_cpu: float  # CPU seconds used by this process (the orchestrator) so far


def interpolate(points: Sequence[tuple[float, float]], t: float) -> float:
    """A cumulative counter's value at `t`, linear between the samples around it (clamped to
    the first and last): the nearest sample alone is up to half an interval off at each end
    of a window, a large error on a window of a few seconds."""
    times = [p[0] for p in points]
    i = bisect.bisect_left(times, t)
    if i == 0:
        return points[0][1]
    if i == len(points):
        return points[-1][1]
    (t0, v0), (t1, v1) = points[i - 1], points[i]
    return v0 + (v1 - v0) * (t - t0) / (t1 - t0) if t1 > t0 else v1


@dataclass
class TreeSampler:
    """Samples a process tree's RSS and CPU time every `interval_s` on a thread, and its PSS
    every `slow_every` samples (also when the tree is re-listed), for peaks and CPU use over
    any time range afterwards; and the CPU this process spends meanwhile (sampling, publishing),
    which is the benchmark's own work too. About 1-2 % of one core."""

    pid: int
    interval_s: float = 0.5
    slow_every: int = 10
    samples: list[TreeSample] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        procs: list[psutil.Process] = []
        pss, count = 0, 0
        while not self._stop.is_set():
            if count % self.slow_every == 0:  # workers appear during start-up: re-list
                procs, pss = tree(self.pid), tree_pss(procs)
            rss, cpu = tree_rss_cpu(procs)
            if rss:
                self.samples.append(
                    TreeSample(time.monotonic(), rss, pss, cpu, time.process_time())
                )
            count += 1
            self._stop.wait(self.interval_s)

    def peak(self, start: float = 0.0, end: float = float("inf")) -> dict[str, float]:
        inside = [s for s in self.samples if start <= s.t <= end]
        if not inside:
            return {"rss_mib": float("nan"), "pss_mib": float("nan"), "samples": 0}
        return {
            "rss_mib": max(s.rss for s in inside) / 2**20,
            "pss_mib": max(s.pss for s in inside) / 2**20,
            "samples": len(inside),
        }

    def cpu_seconds(self, start: float, end: float) -> float:
        """CPU the tree used between two instants (interpolated; NaN without samples)."""
        return self._between([(s.t, s.cpu) for s in self.samples], start, end)

    def harness_cpu_seconds(self, start: float, end: float) -> float:
        """CPU this process used between two instants (interpolated; 0 without samples)."""
        points = [(s.t, s.harness_cpu) for s in self.samples]
        return self._between(points, start, end) if points else 0.0

    @staticmethod
    def _between(points: list[tuple[float, float]], start: float, end: float) -> float:
        if not points:
            return float("nan")
        return interpolate(points, end) - interpolate(points, start)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


@dataclass
class Server:
    name: str
    process: subprocess.Popen[bytes]
    log: Path
    sampler: TreeSampler
    url: str
    grpc_address: str | None = None
    startup_s: float = 0.0
    ready_at: float = 0.0  # time.monotonic() when it turned ready


def _log_tail(log: Path, lines: int = 25) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def wait_ready(
    process: subprocess.Popen[bytes], is_ready: Callable[[], bool], log: Path, timeout_s: float
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServerFailed(
                f"server exited with code {process.returncode} before it was ready; "
                f"log {log}:\n{_log_tail(log)}"
            )
        try:
            if is_ready():
                return
        except (httpx.HTTPError, OSError):
            pass
        time.sleep(0.5)
    raise ServerFailed(f"server not ready after {timeout_s:.0f} s; log {log}:\n{_log_tail(log)}")


def http_ok(url: str) -> Callable[[], bool]:
    return lambda: httpx.get(url, timeout=5).status_code == 200


def stop(process: subprocess.Popen[bytes], grace_s: float = 30.0) -> None:
    """SIGTERM the whole group, then SIGKILL what is left after the grace period."""
    if process.poll() is not None:
        return
    pids = [p.pid for p in tree(process.pid)]
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
    for pid in pids:  # workers that left the group (daemonised) must not outlive the run
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@contextmanager
def serve(
    name: str,
    cmd: list[str],
    *,
    env: dict[str, str],
    ready: Callable[[], bool],
    url: str,
    log_dir: Path,
    cwd: Path,
    grpc_address: str | None = None,
    timeout_s: float = READY_TIMEOUT_S,
) -> Iterator[Server]:
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{name}.log"
    started = time.monotonic()
    with log.open("wb") as out:
        process = subprocess.Popen(
            cmd,
            env={**os.environ, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            start_new_session=True,
        )
    sampler = TreeSampler(process.pid)
    try:
        wait_ready(process, ready, log, timeout_s)
        yield Server(
            name,
            process,
            log,
            sampler,
            url,
            grpc_address,
            startup_s=time.monotonic() - started,
            ready_at=time.monotonic(),
        )
    finally:
        sampler.stop()
        stop(process)

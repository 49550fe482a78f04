"""What the soak watches besides its own requests: /livez latency, the size of /metrics, and the
memory of each server process.

- `LivezProbe`: GET /livez every 100 ms from a process of its own (the soak's event loop and
  its payload building must not delay the probe), for the whole soak: the max is the figure.
- `series`: distinct label sets of every family in /metrics (histogram buckets folded), so
  a label made of request data shows as growth.
- `MemoryWatch`: every process under `graft serve`, named by role (the entry worker, which in
  the one-process layout also holds the models; the inference worker; BentoML's server;
  graft serve itself), sampled every 2 s in a thread: RSS and PSS (/proc/PID/smaps_rollup) per
  role, and the kernel's own high-water mark (VmHWM, peak RSS since the process started).
"""

import multiprocessing
import re
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil

from bench.procs import tree

LIVEZ_EVERY_S = 0.1
LIVEZ_TIMEOUT_S = 10.0
MEMORY_EVERY_S = 2.0
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s")
_LE = re.compile(r'(^|,)le="[^"]*"')
_FOLDED = ("_bucket", "_sum", "_count", "_created")


# -- /livez ----------------------------------------------------------------------------------------


def _probe(url: str, stop: Any, out: Any) -> None:
    latencies: list[float] = []
    failures: dict[str, int] = defaultdict(int)
    with httpx.Client(base_url=url, timeout=LIVEZ_TIMEOUT_S) as client:
        while not stop.is_set():
            started = time.monotonic()
            try:
                status = client.get("/livez").status_code
                if status != 200:
                    failures[str(status)] += 1
            except httpx.HTTPError as exc:
                failures[type(exc).__name__] += 1
            latencies.append(time.monotonic() - started)
            stop.wait(max(0.0, LIVEZ_EVERY_S - (time.monotonic() - started)))
    out.send({"latencies": latencies, "failures": dict(failures)})


class LivezProbe:
    """/livez sampled from another process until `stop()`, which returns the summary."""

    def __init__(self, url: str) -> None:
        context = multiprocessing.get_context("spawn")
        self._stop = context.Event()
        self._receive, send = context.Pipe(duplex=False)
        self._process = context.Process(target=_probe, args=(url, self._stop, send), daemon=True)

    def start(self) -> "LivezProbe":
        self._process.start()
        return self

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        report = self._receive.recv() if self._receive.poll(LIVEZ_TIMEOUT_S + 30) else {}
        self._process.join(10)
        if self._process.is_alive():
            self._process.kill()
        return summarize_livez(report.get("latencies", []), report.get("failures", {"lost": 1}))


def summarize_livez(latencies: list[float], failures: dict[str, int]) -> dict[str, Any]:
    values = np.array(latencies or [float("inf")])
    return {
        "samples": len(latencies),
        "max_ms": round(float(values.max()) * 1000, 1),
        "p50_ms": round(float(np.percentile(values, 50)) * 1000, 1),
        "p99_ms": round(float(np.percentile(values, 99)) * 1000, 1),
        "over_1s": int((values > 1.0).sum()),
        "failures": failures,
    }


# -- /metrics --------------------------------------------------------------------------------------


def series(text: str) -> set[str]:
    """The distinct (family, label set) pairs of a Prometheus text page, buckets folded."""
    found = set()
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match is None:
            continue
        name = match[1]
        for suffix in _FOLDED:
            if name.endswith(suffix):
                name = name[: -len(suffix)]
                break
        labels = _LE.sub("", (match[2] or "{}")[1:-1]).strip(",")
        found.add(f"{name}{{{labels}}}")
    return found


def metrics_snapshot(url: str) -> dict[str, Any]:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return {"bytes": len(text), "series": series(text)}


# -- memory ----------------------------------------------------------------------------------------


def role_of(process: psutil.Process, root_pid: int) -> str:
    """What a process under `graft serve` is: entry / inference worker, BentoML, graft serve."""
    if process.pid == root_pid:
        return "graft-serve"
    command = process.cmdline()
    if "--service-name" in command[:-1]:
        service = command[command.index("--service-name") + 1]
        return {"graft": "entry", "graft-inference": "inference"}.get(service, service)
    if "service.app.server_process" in command:
        return "bentoml-server"
    return process.name()


def _status_kib(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _pss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def memory_by_role(root_pid: int) -> dict[str, dict[str, int]]:
    """Now, per role: RSS, PSS and VmHWM in KiB, summed over that role's processes."""
    out: dict[str, dict[str, int]] = defaultdict(lambda: {"rss": 0, "pss": 0, "hwm": 0})
    for process in tree(root_pid):
        try:
            role = role_of(process, root_pid)
        except psutil.Error:
            continue
        entry = out[role]
        entry["rss"] += _status_kib(process.pid, "VmRSS")
        entry["pss"] += _pss_kib(process.pid)
        entry["hwm"] += _status_kib(process.pid, "VmHWM")
    return dict(out)


class MemoryWatch(threading.Thread):
    """Samples `memory_by_role` every MEMORY_EVERY_S until `stop()`; keeps the first sample,
    the last one and the peaks."""

    def __init__(self, root_pid: int | None) -> None:
        super().__init__(daemon=True)
        self._root = root_pid
        self._done = threading.Event()
        self.first: dict[str, dict[str, int]] = {}
        self.last: dict[str, dict[str, int]] = {}
        self.peak: dict[str, dict[str, int]] = defaultdict(lambda: {"rss": 0, "pss": 0})

    def run(self) -> None:
        while self._root is not None and not self._done.is_set():
            self.sample()
            self._done.wait(MEMORY_EVERY_S)

    def sample(self) -> None:
        now = memory_by_role(self._root) if self._root is not None else {}
        self.first = self.first or now
        self.last = now
        for role, values in now.items():
            for key in ("rss", "pss"):
                self.peak[role][key] = max(self.peak[role][key], values[key])

    def stop(self) -> dict[str, dict[str, float]]:
        """Per role, in MiB: RSS and PSS at the start and the end, their sampled peaks, and
        the high-water mark of RSS (VmHWM) at the start and at the end."""
        self._done.set()
        if self.is_alive():
            self.join(MEMORY_EVERY_S * 5)
        if self._root is not None:
            self.sample()
        report = {}
        for role, values in self.last.items():
            first = self.first.get(role, values)
            report[role] = {
                "rss_start": first["rss"] / 1024,
                "rss_end": values["rss"] / 1024,
                "rss_peak": self.peak[role]["rss"] / 1024,
                "pss_start": first["pss"] / 1024,
                "pss_end": values["pss"] / 1024,
                "pss_peak": self.peak[role]["pss"] / 1024,
                "hwm_start": first["hwm"] / 1024,
                "hwm_end": values["hwm"] / 1024,
            }
        return {role: {k: round(v, 1) for k, v in r.items()} for role, r in report.items()}

"""Graceful stop for `graft serve`: readiness turns false first, in-flight requests finish,
then the workers stop and the command exits 0.

BentoML's supervisor (circus) stops every worker at once on SIGTERM, so the inference worker
can disappear under requests the entry workers are still answering: measured, a SIGTERM under
load gave 503s and reset connections. `graft serve` therefore runs the BentoML server as a
child process and handles SIGTERM / SIGINT itself:

1. it creates the drain marker (`GRAFT_DRAIN_FILE`): from then on `/readyz` answers 503 and
   gRPC health NOT_SERVING, so load balancers and the kubelet stop routing here, while every
   request that still arrives is served normally;
2. it waits `shutdown_drain_s` for routing to converge, then until no image is waiting for
   inference (`graft_images_in_flight` on /metrics), for at most `request_timeout_s`;
3. it SIGTERMs the BentoML server, waits for it and exits with its status.

Kubernetes: keep `terminationGracePeriodSeconds` above drain + request timeout + ~10 s.
"""

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx

from service.app.drain import DRAIN_FILE_VARIABLE
from service.settings import GraftSettings

_POLL_S = 0.2
_QUIET_POLLS = 3


def serve_gracefully(child_command: list[str], settings: GraftSettings, drain_file: Path) -> int:
    """Run `child_command` (the BentoML server) until it exits or this process is told to stop;
    returns the exit status to leave with."""
    os.environ[DRAIN_FILE_VARIABLE] = str(drain_file)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    child = subprocess.Popen(child_command)
    while child.poll() is None and not stop.wait(_POLL_S):
        pass
    if child.poll() is not None:
        return child.returncode
    drain_file.touch()
    _wait_for_quiet(child, settings)
    if child.poll() is None:
        child.send_signal(signal.SIGTERM)
    return 0 if child.wait() in (0, -signal.SIGTERM) else child.returncode


def _wait_for_quiet(child: subprocess.Popen, settings: GraftSettings) -> None:
    """Drain time, then until nothing is in flight; cut short when the server is already gone
    (a process-group SIGTERM reaches the BentoML child directly)."""
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
    url = f"http://{host}:{settings.port}/metrics"
    drained = time.monotonic() + settings.shutdown_drain_s
    deadline = drained + settings.request_timeout_s
    quiet = 0  # consecutive polls with nothing in flight: one could fall between two requests
    while child.poll() is None and time.monotonic() < deadline and quiet < _QUIET_POLLS:
        if time.monotonic() >= drained:
            quiet = quiet + 1 if _in_flight(url) == 0 else 0
        time.sleep(_POLL_S)


def _in_flight(metrics_url: str) -> float | None:
    """Images admitted and not yet answered, over every entry worker; None when the server
    does not answer (busy: keep waiting, up to the deadline)."""
    try:
        text = httpx.get(metrics_url, timeout=5).text
    except httpx.HTTPError:
        return None
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("graft_images_in_flight")
    )

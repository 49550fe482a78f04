"""Run a real `graft serve` on free loopback ports for integration tests.

    from support.server import running_server
    with running_server(model_root, default_model="colours", grpc=True) as server:
        httpx.post(f"{server.http}/classify", files=...)
        grpc.insecure_channel(server.grpc_target)

The server is a subprocess, started in its own process group so that nothing survives the
test; its output goes to `server.log` for failure messages. With `workers=1` (the default, as
for `graft serve`) one BentoML worker serves the requests and owns the models; with more, or
with `separate_inference=True`, the entry workers call a separate inference worker
(`graft-inference`), which `paused_inference` can freeze.
"""

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import httpx

START_TIMEOUT_S = 180.0  # two TensorFlow processes start on a contended 2-core machine
STOP_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class RunningServer:
    http: str  # e.g. http://127.0.0.1:41234
    grpc_target: str | None  # e.g. 127.0.0.1:41235, None when gRPC is off
    log: Path
    process: subprocess.Popen

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def running_server(
    model_root: Path,
    *,
    default_model: str | None = "imagenet",
    grpc: bool = False,
    workers: int = 1,
    separate_inference: bool = False,
    env: dict[str, str] | None = None,
    start_timeout_s: float = START_TIMEOUT_S,
) -> Iterator[RunningServer]:
    """Start `graft serve`, wait until /readyz is 200, yield its addresses, then stop it.

    `env` adds GRAFT_* settings (e.g. {"GRAFT_ADMIN_TOKEN": "s3cret"}); everything else
    comes from the flags (`default_model=None` passes no --default-model). `separate_inference`
    runs the models in a worker of their own (GRAFT_SEPARATE_INFERENCE) even with one entry
    worker, as `paused_inference` needs. Raises RuntimeError with the server's log if it never
    gets ready.
    """
    port, grpc_port = free_port(), free_port() if grpc else 0
    command = [
        str(Path(sys.executable).parent / "graft"),
        "serve",
        "--model-root", str(model_root),
        "--host", "127.0.0.1",
        "--port", str(port),
        "--grpc-port", str(grpc_port),
        *(["--default-model", default_model] if default_model is not None else []),
        "--workers", str(workers),
    ]  # fmt: skip
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("GRAFT_")}
    if separate_inference:
        child_env["GRAFT_SEPARATE_INFERENCE"] = "true"
    child_env.update(env or {})
    log = Path(tempfile.mkstemp(prefix="graft-serve-", suffix=".log")[1])
    with log.open("wb") as sink:
        process = subprocess.Popen(
            command, stdout=sink, stderr=subprocess.STDOUT, env=child_env, start_new_session=True
        )
    server = RunningServer(
        http=f"http://127.0.0.1:{port}",
        grpc_target=f"127.0.0.1:{grpc_port}" if grpc else None,
        log=log,
        process=process,
    )
    try:
        _wait_ready(server, start_timeout_s)
        yield server
    finally:
        _stop(process)


def wait_for_model(server: RunningServer, name: str, timeout_s: float = START_TIMEOUT_S) -> None:
    """Wait until `name` has an AVAILABLE version (/readyz only waits for the default model)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        response = httpx.get(f"{server.http}/v1/models/{name}", timeout=10)
        if response.status_code == 200:
            states = [v["state"] for v in response.json()["model_version_status"]]
            if "AVAILABLE" in states:
                return
        time.sleep(0.5)
    raise RuntimeError(
        f"model {name!r} not available after {timeout_s:.0f} s:\n{server.log_tail()}"
    )


def kill_9(server: RunningServer) -> None:
    """SIGKILL the whole server, as a crash or an OOM kill would: `graft serve` and every
    BentoML process below it (BentoML starts its workers in sessions of their own, so the
    process group alone would miss them). Parents go first, so that nothing is respawned."""
    import psutil  # a BentoML dependency

    root = psutil.Process(server.process.pid)
    for process in [root, *root.children(recursive=True)]:
        with suppress(psutil.NoSuchProcess):
            process.kill()
    server.process.wait()


def bentoml_workers(server: RunningServer, service: str) -> list:
    """The worker processes (psutil) of BentoML service `service` ("graft", the entry, or
    "graft-inference") under `server`; `graft serve` supervises the BentoML server as a child,
    so the workers are grandchildren."""
    import psutil  # a BentoML dependency

    found = []
    for process in psutil.Process(server.process.pid).children(recursive=True):
        with suppress(psutil.Error):  # the process ended while we looked
            command = process.cmdline()
            named = "--service-name" in command[:-1]
            if named and command[command.index("--service-name") + 1] == service:
                found.append(process)
    return found


def model_worker(server: RunningServer) -> object:
    """The one process that holds the models (psutil): the inference worker of the two-process
    layout, or the only worker of the one-process layout."""
    workers = bentoml_workers(server, "graft-inference") or bentoml_workers(server, "graft")
    assert len(workers) == 1, (
        f"{len(workers)} model workers under graft serve:\n{server.log_tail()}"
    )
    return workers[0]


@contextmanager
def paused_inference(server: RunningServer) -> Iterator[None]:
    """Freeze the model worker (SIGSTOP), as a hung model or a stalled host would, and resume
    it (SIGCONT) on exit: requests already admitted stay admitted until their deadline.

    Only the two-process layout has a model worker apart from the entry, so the server must
    run with `separate_inference=True` (or `workers=2`): freezing the one worker of the
    one-process layout would freeze its HTTP side too."""
    import psutil  # a BentoML dependency

    workers = bentoml_workers(server, "graft-inference")
    assert workers, (
        "no graft-inference worker under graft serve: paused_inference needs the two-process "
        f"layout, running_server(..., separate_inference=True):\n{server.log_tail()}"
    )
    for worker in workers:
        worker.suspend()
    try:
        yield
    finally:
        for worker in workers:
            with suppress(psutil.NoSuchProcess):
                worker.resume()


def images_in_flight(server: RunningServer) -> float:
    """The entry's graft_images_in_flight gauge: images admitted and not yet answered."""
    metrics = httpx.get(f"{server.http}/metrics", timeout=10).text
    values = [
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("graft_images_in_flight")
    ]
    assert values, "the server exports no graft_images_in_flight gauge"
    return sum(values)


def wait_for_images_in_flight(server: RunningServer, count: int, timeout_s: float = 30) -> None:
    """Until exactly `count` images are admitted, e.g. a burst sent to a paused model worker."""
    deadline = time.monotonic() + timeout_s
    while images_in_flight(server) != count:
        assert time.monotonic() < deadline, f"the gauge never showed {count} images in flight"
        time.sleep(0.01)


def _wait_ready(server: RunningServer, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"graft serve exited early:\n{server.log_tail()}")
        try:
            if httpx.get(f"{server.http}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"graft serve not ready after {timeout_s:.0f} s:\n{server.log_tail()}")


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM the whole process group (graceful), SIGKILL whatever is left after a while.

    BentoML starts its workers in sessions of their own, so the group alone misses them when
    the graceful stop times out: every descendant seen before and after it is killed too, or
    a stuck worker would outlive the test and take the CPU from the rest of the suite."""
    descendants = _descendants(process)
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        with suppress(subprocess.TimeoutExpired):
            process.wait(STOP_TIMEOUT_S)
    descendants += _descendants(process)
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    for child in descendants:
        with suppress(Exception):  # psutil.NoSuchProcess: it ended on its own
            child.kill()
    process.wait()


def _descendants(process: subprocess.Popen) -> list:
    import psutil  # a BentoML dependency

    try:
        return psutil.Process(process.pid).children(recursive=True)
    except psutil.Error:
        return []

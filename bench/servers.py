"""How to start each server under test, all serving the same SavedModel on loopback."""

import base64
import json
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.config import BENCH_DIR, KSERVE_PYTHON, RESULTS_DIR, VENV_BIN
from bench.images import REPO_ROOT
from bench.procs import Server, free_port, http_ok, serve
from bench.targets import multipart
from service.store.layout import ONNX_FILE


class Unavailable(RuntimeError):
    """A server that cannot run here; the message is the one line that says why and what to
    do. Its section is skipped, not failed."""


@dataclass(frozen=True)
class Model:
    """The one model every peer serves: a version folder of a graft model repository."""

    name: str
    version: int
    path: Path
    backbone: str
    image_size: int
    classes: int

    @property
    def onnx(self) -> Path | None:
        """The version's accelerated network, if it was exported with one."""
        path = self.path / ONNX_FILE
        return path if path.is_file() else None

    def require_onnx(self) -> Path:
        if self.onnx is None:
            raise Unavailable(
                f"{self.name} v{self.version} has no {ONNX_FILE} (exported before graft "
                "wrote one): export it again to measure the ONNX peers and runtimes"
            )
        return self.onnx


def _probe_jpeg() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (90, 140, 60)).save(buffer, format="JPEG")
    return buffer.getvalue()


def primed(health_url: str, predict_url: str, body: bytes, content_type: str) -> Callable[[], bool]:
    """Ready = healthy AND one real prediction answered. The peers load the model lazily enough
    that their first call traces and optimises the graph (seconds); graft does that before
    /readyz turns true, so without this the peers' first measured requests would pay it."""

    def ready() -> bool:
        if httpx.get(health_url, timeout=5).status_code != 200:
            return False
        headers = {"content-type": content_type}
        return (
            httpx.post(predict_url, content=body, headers=headers, timeout=120).status_code == 200
        )

    return ready


def _python() -> str:
    venv_python = VENV_BIN / "python"
    return str(venv_python) if venv_python.exists() else sys.executable


def scratch_repository(model: Model, label: str) -> Path:
    """A fresh repository holding only `model` as version 1, so graft serves exactly it and
    the switch section can publish version 2 without touching the user's repository."""
    from service.store.repository import ModelRepository

    root = RESULTS_DIR / "work" / f"{label}-repository"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    ModelRepository(root).publish(model.path, model.name)
    return root


@contextmanager
def graft(model: Model, label: str, env: dict[str, str] | None = None) -> Iterator[Server]:
    root = scratch_repository(model, label)
    port, grpc_port = free_port(), free_port()
    graft_bin = VENV_BIN / "graft"
    cmd = [str(graft_bin) if graft_bin.exists() else "graft", "serve"]
    cmd += ["--model-root", str(root), "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--grpc-port", str(grpc_port), "--default-model", model.name]
    url = f"http://127.0.0.1:{port}"
    with serve(
        label,
        cmd,
        env=env or {},
        ready=http_ok(f"{url}/readyz"),
        url=url,
        log_dir=RESULTS_DIR / "logs",
        cwd=REPO_ROOT,
        grpc_address=f"127.0.0.1:{grpc_port}",
    ) as server:
        yield server


# section -> the tutorial app it serves: one FastAPI app, the SavedModel or its ONNX network
TUTORIAL_APPS = {
    "tutorial": "bench.peers.tutorial_app:app",
    "tutorial-onnx": "bench.peers.tutorial_onnx_app:app",
}


@contextmanager
def tutorial(model: Model, name: str = "tutorial") -> Iterator[Server]:
    if name == "tutorial-onnx":
        model.require_onnx()
    port = free_port()
    cmd = [_python(), "-m", "uvicorn", TUTORIAL_APPS[name], "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--no-access-log"]
    url = f"http://127.0.0.1:{port}"
    body, content_type = multipart({}, "file", _probe_jpeg())
    with serve(
        name,
        cmd,
        env={"MODEL_DIR": str(model.path)},
        ready=primed(f"{url}/healthz", f"{url}/predict", body, content_type),
        url=url,
        log_dir=RESULTS_DIR / "logs",
        cwd=REPO_ROOT,
    ) as server:
        yield server


KSERVE_SETUP = BENCH_DIR / "peers" / "setup_kserve.sh"


def kserve_available() -> bool:
    return KSERVE_PYTHON.exists()


def ensure_kserve(build: bool) -> None:
    """KServe's venv, built when missing if `build` (about 2 minutes); else Unavailable."""
    if kserve_available():
        return
    setup = KSERVE_SETUP.relative_to(REPO_ROOT)
    if not build:
        raise Unavailable(
            f"KServe's venv is missing and --quick does not build it (about 2 minutes): run "
            f"`bash {setup}` once, or `make bench`"
        )
    print(f"[bench] creating KServe's venv ({setup}, about 2 minutes)", flush=True)
    subprocess.run(["bash", str(KSERVE_SETUP)], check=True)


@contextmanager
def kserve(model: Model) -> Iterator[Server]:
    port = free_port()
    cmd = [str(KSERVE_PYTHON), "-m", "bench.peers.kserve_model", "--model_dir", str(model.path)]
    cmd += ["--model_name", model.name, "--http_port", str(port)]
    url = f"http://127.0.0.1:{port}"
    model_url = f"{url}/v1/models/{model.name}"
    body = json.dumps({"instances": [{"b64": base64.b64encode(_probe_jpeg()).decode()}]})
    with serve(
        "kserve",
        cmd,
        env={},
        ready=primed(model_url, f"{model_url}:predict", body.encode(), "application/json"),
        url=url,
        log_dir=RESULTS_DIR / "logs",
        cwd=REPO_ROOT,
    ) as server:
        yield server


@contextmanager
def null_server() -> Iterator[Server]:
    """A server that does no work, to see how fast the load generator alone can go."""
    port = free_port()
    cmd = [_python(), "-m", "uvicorn", "bench.null_app:app", "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--no-access-log"]
    url = f"http://127.0.0.1:{port}"
    with serve(
        "null",
        cmd,
        env={},
        ready=http_ok(f"{url}/healthz"),
        url=url,
        log_dir=RESULTS_DIR / "logs",
        cwd=REPO_ROOT,
    ) as server:
        yield server

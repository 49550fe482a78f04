"""`bentoml build` packages graft offline, and the built Bento serves: HTTP and gRPC.

The Bento is built into a private BENTOML_HOME with every network route closed, then started
the way its container starts (deploy/bento/entrypoint.sh, which ends in `bentoml serve
$BENTO_PATH`) on an empty model repository: it must install the default model, answer
/readyz, classify a photo and report SERVING over gRPC health.
"""

import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support.trained import tinted_photo

ROOT = Path(__file__).resolve().parents[1]
BENTOML = str(Path(sys.executable).parent / "bentoml")
# Installing the default model (~75 s) then starting two TensorFlow processes (~70 s) on a
# contended 2-core machine.
START_TIMEOUT_S = 420.0
# Any connection attempt fails fast: the build must not need the network.
OFFLINE = {
    "HTTP_PROXY": "http://127.0.0.1:9",
    "HTTPS_PROXY": "http://127.0.0.1:9",
    "ALL_PROXY": "http://127.0.0.1:9",
    "NO_PROXY": "",
    "PIP_NO_INDEX": "1",
    "UV_OFFLINE": "1",
    "BENTOML_DO_NOT_TRACK": "True",
}


def _bentofile() -> dict:
    return yaml.safe_load((ROOT / "bentofile.yaml").read_text())


def test_bento_requirements_are_the_project_dependencies() -> None:
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    packages = _bentofile()["python"]["packages"]
    assert packages == dependencies, (
        "bentofile.yaml python.packages must equal [project].dependencies in pyproject.toml: "
        "copy the list over"
    )


@dataclass(frozen=True)
class Bento:
    tag: str
    path: Path
    home: Path


@pytest.fixture(scope="module")
def bento(tmp_path_factory: pytest.TempPathFactory) -> Bento:
    home = tmp_path_factory.mktemp("bentoml-home")
    env = {**_clean_env(), **OFFLINE, "BENTOML_HOME": str(home)}
    result = subprocess.run(
        [BENTOML, "build", "--output", "tag"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"bentoml build failed:\n{result.stdout}\n{result.stderr}"
    tag = result.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    name, version = tag.split(":")
    return Bento(tag=tag, path=home / "bentos" / name / version, home=home)


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("GRAFT_", "BENTOML_"))}


def test_bento_carries_every_module_of_both_packages(bento: Bento) -> None:
    packaged = {p.relative_to(bento.path / "src") for p in (bento.path / "src").rglob("*.py")}
    for package in ("service", "training"):
        for module in (ROOT / package).rglob("*.py"):
            if "__pycache__" not in module.parts:
                assert module.relative_to(ROOT) in packaged, f"{module} is missing from the Bento"
    assert not list((bento.path / "src").rglob("__pycache__"))


def test_bento_container_exposes_both_ports_and_the_model_volume(bento: Bento) -> None:
    dockerfile = (bento.path / "env" / "docker" / "Dockerfile").read_text()
    assert "EXPOSE 3000" in dockerfile and "EXPOSE 50051" in dockerfile
    model_root = next(e["value"] for e in _bentofile()["envs"] if e["name"] == "GRAFT_MODEL_ROOT")
    assert "ENV GRAFT_MODEL_ROOT=$GRAFT_MODEL_ROOT" in dockerfile
    assert f'VOLUME ["{model_root}"]' in dockerfile
    assert f"chown bentoml:bentoml {model_root}" in dockerfile
    assert "ENV GRAFT_HOST=$GRAFT_HOST" in dockerfile  # gRPC must bind beyond loopback
    entrypoints = [ln for ln in dockerfile.splitlines() if ln.startswith("ENTRYPOINT")]
    assert "/src/deploy/bento/entrypoint.sh" in entrypoints[-1], "no default-model bootstrap"
    # Not locked at build time (that would resolve against PyPI): the ranges are installed.
    python_env = bento.path / "env" / "python"
    assert not (python_env / "requirements.lock.txt").exists()
    requirements = (python_env / "requirements.txt").read_text().splitlines()
    assert (
        requirements[: len(_bentofile()["python"]["packages"])]
        == _bentofile()["python"]["packages"]
    )


def test_container_entrypoint_refuses_to_start_without_a_model_root(bento: Bento) -> None:
    entrypoint = bento.path / "src" / "deploy" / "bento" / "entrypoint.sh"
    env = {**_clean_env(), "BENTO_PATH": str(bento.path)}
    result = subprocess.run(
        ["/bin/sh", str(entrypoint)], env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode != 0
    assert "GRAFT_MODEL_ROOT must name the model repository" in result.stderr


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class Served:
    http: str
    grpc_target: str
    model_root: Path
    log: Path


@pytest.fixture(scope="module")
def served(bento: Bento, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """The Bento started the way its container starts it: through deploy/bento/entrypoint.sh,
    on an empty model repository, with BENTO_PATH pointing at the built Bento."""
    scratch = tmp_path_factory.mktemp("bento-serve")
    model_root = scratch / "models"
    port, grpc_port = _free_port(), _free_port()
    env = {
        **_clean_env(),
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "BENTO_PATH": str(bento.path),
        "BENTOML_HOME": str(bento.home),
        "BENTOML_DO_NOT_TRACK": "True",
        "GRAFT_MODEL_ROOT": str(model_root),
        "GRAFT_HOST": "127.0.0.1",
        "GRAFT_GRPC_PORT": str(grpc_port),
    }
    log = scratch / "serve.log"
    entrypoint = bento.path / "src" / "deploy" / "bento" / "entrypoint.sh"
    command = ["/bin/sh", str(entrypoint), "--host", "127.0.0.1", "--port", str(port)]
    with log.open("wb") as sink:
        process = subprocess.Popen(
            command, cwd=scratch, env=env, stdout=sink, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    server = Served(f"http://127.0.0.1:{port}", f"127.0.0.1:{grpc_port}", model_root, log)
    try:
        _wait_ready(server, process)
        yield server
    finally:
        _stop(process)


def _wait_ready(server: Served, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"bentoml serve exited early:\n{_tail(server.log)}")
        try:
            if httpx.get(f"{server.http}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    pytest.fail(f"the Bento was not ready after {START_TIMEOUT_S:.0f} s:\n{_tail(server.log)}")


def _tail(log: Path, lines: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.mark.slow
def test_served_bento_bootstraps_the_default_model_and_classifies(served: Served) -> None:
    from service.store.repository import ModelRepository

    assert ModelRepository(served.model_root).models() == ["imagenet"]
    assert "holds no model: installing the ImageNet default" in served.log.read_text()
    assert httpx.get(f"{served.http}/livez", timeout=5).status_code == 200
    photo = tinted_photo("red")
    response = httpx.post(
        f"{served.http}/classify", files=[("images", ("red.jpg", photo, "image/jpeg"))], timeout=60
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["model"], body["version"]) == ("imagenet", 1)
    assert len(body["results"]) == 1 and body["results"][0]["label"]
    metrics = httpx.get(f"{served.http}/metrics", timeout=10).text
    assert 'graft_model_loads_total{model="imagenet",outcome="loaded"}' in metrics


@pytest.mark.slow
def test_served_bento_answers_grpc_health(served: Served) -> None:
    with grpc.insecure_channel(served.grpc_target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=30
        )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING

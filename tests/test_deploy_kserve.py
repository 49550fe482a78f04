"""k8s/kserve: graft as a KServe ServingRuntime, checked offline.

The kustomization is rendered with `kubectl kustomize` and each manifest is validated against
KServe's own CRD schema (tests/data/kserve, vendored with its source), strictly: a field the
schema does not know fails, as the API server's strict field validation would. The runtime's
container is validated as the Pod container KServe makes of it (kubernetes-validate), and its
command, with KServe's `{{.Name}}` filled in, is parsed by the real `graft` CLI.
"""

import copy
import json
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from support.cli import parse_graft

from service.settings import GraftSettings
from service.store.repository import NAME_PATTERN

ROOT = Path(__file__).resolve().parents[1]
KSERVE = ROOT / "k8s" / "kserve"
SCHEMAS = Path(__file__).resolve().parent / "data" / "kserve"
K8S_VERSION = "1.35.0"  # as tests/test_deploy.py
MOUNT = "/mnt/models"  # where KServe puts the model's storage

Doc = dict[str, Any]


@pytest.fixture(scope="module")
def rendered() -> dict[str, Doc]:
    kubectl = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which(
        "kubectl"
    )
    if kubectl is None:
        pytest.skip("`kubectl` is not installed: install kubectl (it bundles kustomize)")
    result = subprocess.run(
        [kubectl, "kustomize", str(KSERVE)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    docs = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    kinds = [doc["kind"] for doc in docs]
    assert sorted(kinds) == ["InferenceService", "ServingRuntime"], kinds
    return {doc["kind"]: doc for doc in docs}


def _vendored(kind: str) -> Doc:
    return json.loads((SCHEMAS / f"{kind.lower()}.schema.json").read_text())


def _strict(schema: Any) -> Any:
    """The schema with unknown fields refused wherever Kubernetes would refuse them: in every
    object that lists its properties and does not preserve unknown fields."""
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    strict = {key: _strict(value) for key, value in schema.items()}
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        strict["additionalProperties"] = False
    return strict


def schema_errors(doc: Doc) -> list[str]:
    """What KServe's CRD schema finds wrong with `doc`, one line per problem, path first."""
    vendored = _vendored(doc["kind"])
    assert doc["apiVersion"] == vendored["apiVersion"], f"{doc['kind']}: wrong apiVersion"
    # CRD schemas are OpenAPI 3.0, whose keywords are JSON Schema draft 4's.
    validator = jsonschema.Draft4Validator(_strict(vendored["openAPIV3Schema"]))
    return sorted(
        f"{'.'.join(map(str, error.absolute_path)) or '<root>'}: {error.message}"
        for error in validator.iter_errors(doc)
    )


@pytest.mark.parametrize("kind", ["ServingRuntime", "InferenceService"])
def test_each_manifest_validates_against_kserves_crd_schema(
    rendered: dict[str, Doc], kind: str
) -> None:
    errors = schema_errors(rendered[kind])
    hint = (
        "\n(a real KServe field that is not vendored: add it to CRDS in "
        "tests/data/kserve/vendor.py and re-run it)"
    )
    assert not errors, "\n".join(errors) + hint


def _runtime_container(doc: Doc) -> Doc:
    return doc["spec"]["containers"][0]


def _model(doc: Doc) -> Doc:
    return doc["spec"]["predictor"]["model"]


def _delete(path: str) -> Callable[[Doc], None]:
    *parents, last = path.split(".")

    def change(doc: Doc) -> None:
        node: Any = doc
        for part in parents:
            node = node[int(part)] if part.isdigit() else node[part]
        del node[last]

    return change


MUTATIONS: list[tuple[str, Callable[[Doc], Any], str]] = [
    ("ServingRuntime", _delete("spec.containers"), "spec: 'containers' is a required property"),
    (
        "ServingRuntime",
        _delete("spec.supportedModelFormats.0.name"),
        "spec.supportedModelFormats.0: 'name' is a required property",
    ),
    (
        "ServingRuntime",
        lambda d: _runtime_container(d)["ports"][1].update(containerPort="9000"),
        "spec.containers.0.ports.1.containerPort: '9000' is not of type 'integer'",
    ),
    (
        "ServingRuntime",
        lambda d: d["spec"].update(protocolVersions="v2"),
        "spec.protocolVersions: 'v2' is not of type 'array'",
    ),
    (
        "ServingRuntime",
        lambda d: _runtime_container(d).update(argz=[]),
        "spec.containers.0: Additional properties are not allowed ('argz' was unexpected)",
    ),
    ("InferenceService", _delete("spec.predictor"), "spec: 'predictor' is a required property"),
    (
        "InferenceService",
        _delete("spec.predictor.model.modelFormat.name"),
        "spec.predictor.model.modelFormat: 'name' is a required property",
    ),
    (
        "InferenceService",
        lambda d: d["spec"]["predictor"].update(minReplicas="one"),
        "spec.predictor.minReplicas: 'one' is not of type 'integer'",
    ),
    (
        "InferenceService",
        lambda d: _model(d).update(storageURI=_model(d).pop("storageUri")),
        "Additional properties are not allowed ('storageURI' was unexpected)",
    ),
]


@pytest.mark.parametrize(("kind", "mutate", "expected"), MUTATIONS)
def test_the_schema_check_fails_on_a_missing_field_a_wrong_type_or_a_typo(
    rendered: dict[str, Doc], kind: str, mutate: Callable[[Doc], Any], expected: str
) -> None:
    broken = copy.deepcopy(rendered[kind])
    mutate(broken)
    errors = schema_errors(broken)
    assert any(expected in error for error in errors), errors


def test_runtime_and_inference_service_fit_together(rendered: dict[str, Doc]) -> None:
    runtime, service = rendered["ServingRuntime"], rendered["InferenceService"]
    model = _model(service)
    assert model["runtime"] == runtime["metadata"]["name"] == "graft"
    formats = {f["name"]: f for f in runtime["spec"]["supportedModelFormats"]}
    assert formats["graft"]["autoSelect"] is True
    assert model["modelFormat"]["name"] in formats
    assert runtime["spec"]["protocolVersions"] == ["v2", "grpc-v2"]
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]
    assert not runtime["spec"].get("multiModel"), "KServe mounts one model per pod"
    # KServe names the model after the InferenceService: it must be a valid graft name.
    assert NAME_PATTERN.match(service["metadata"]["name"])
    claim, _, folder = model["storageUri"].removeprefix("pvc://").partition("/")
    base_claims = [
        doc["metadata"]["name"]
        for doc in yaml.safe_load_all((ROOT / "k8s" / "base" / "pvc.yaml").read_text())
        if doc and doc["kind"] == "PersistentVolumeClaim"
    ]
    assert model["storageUri"].startswith("pvc://") and claim in base_claims
    assert folder == service["metadata"]["name"], "the model's folder, served under its name"
    # Two ports (HTTP and gRPC): Knative mode allows one, so the example asks for Standard.
    assert service["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Standard"


def _served_command(runtime: Doc, service: Doc) -> list[str]:
    """The container's command line as KServe runs it: `{{.Name}}` is the service's name."""
    container = _runtime_container(runtime)
    argv = [*container["command"], *container["args"]]
    filled = [arg.replace("{{.Name}}", service["metadata"]["name"]) for arg in argv]
    assert not [arg for arg in filled if "{{" in arg], f"unfilled placeholders in {filled}"
    return filled


def test_the_runtime_starts_graft_serve_in_single_model_mode_on_kserves_ports(
    rendered: dict[str, Doc],
) -> None:
    runtime, service = rendered["ServingRuntime"], rendered["InferenceService"]
    container = _runtime_container(runtime)
    assert container["name"] == "kserve-container"
    params = parse_graft(_served_command(runtime, service))
    assert params["model_name"] == service["metadata"]["name"]
    assert params["model_root"] == Path(MOUNT)
    assert params["host"] == "0.0.0.0"
    ports = [(p["name"], p["containerPort"]) for p in container["ports"]]
    # KServe routes HTTP to the first port, and treats a port named h2c as gRPC.
    assert (
        ports
        == [("http1", params["port"]), ("h2c", params["grpc_port"])]
        == [
            ("http1", 8080),
            ("h2c", 9000),
        ]
    )
    assert runtime["spec"]["annotations"]["prometheus.kserve.io/port"] == str(params["port"])
    assert runtime["spec"]["annotations"]["prometheus.kserve.io/path"] == "/metrics"

    env = {e["name"]: e["value"] for e in container["env"]}
    fields = {f"GRAFT_{name.upper()}" for name in GraftSettings.model_fields}
    graft_env = {k: v for k, v in env.items() if k.startswith("GRAFT_")}
    assert graft_env.keys() <= fields, f"unknown settings: {graft_env.keys() - fields}"
    flags = {k: v for k, v in params.items() if v is not None}
    settings = GraftSettings(
        **{k.removeprefix("GRAFT_").lower(): v for k, v in graft_env.items()}, **flags
    )
    assert settings.default_model == service["metadata"]["name"]
    assert settings.admin_token is None, "KServe pods take new versions from the volume only"
    probes = {kind: container[f"{kind}Probe"]["httpGet"] for kind in ("startup", "liveness")}
    probes["readiness"] = container["readinessProbe"]["httpGet"]
    assert {kind: (p["path"], p["port"]) for kind, p in probes.items()} == {
        "startup": ("/livez", "http1"),
        "liveness": ("/livez", "http1"),
        "readiness": ("/readyz", "http1"),
    }


def _as_pod(runtime: Doc) -> Doc:
    """The Pod KServe builds from the runtime: its container and volumes, the model mounted."""
    container = copy.deepcopy(_runtime_container(runtime))
    container["volumeMounts"].append({"name": "kserve-pvc-source", "mountPath": MOUNT})
    volumes = [
        *runtime["spec"]["volumes"],
        {"name": "kserve-pvc-source", "persistentVolumeClaim": {"claimName": "graft-models"}},
    ]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "plants-predictor"},
        "spec": {"containers": [container], "volumes": volumes},
    }


def test_the_runtime_container_is_a_valid_locked_down_pod_container(
    rendered: dict[str, Doc],
) -> None:
    import kubernetes_validate

    runtime = rendered["ServingRuntime"]
    try:
        kubernetes_validate.validate(_as_pod(runtime), K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"the runtime's container is not a valid Pod container: {exc.message}")
    container = _runtime_container(runtime)
    security = container["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] != 0
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert security["seccompProfile"]["type"] == "RuntimeDefault"
    assert "limits" in container["resources"] and "requests" in container["resources"]
    volumes = {v["name"]: v for v in runtime["spec"]["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
    assert "emptyDir" in mounts["/tmp"], "no writable /tmp under the read-only root"
    env = {e["name"]: e["value"] for e in container["env"]}
    for variable in ("HOME", "XDG_CACHE_HOME", "MPLCONFIGDIR"):
        assert Path(env[variable]).is_relative_to("/tmp"), variable


def _walk(schema: Any) -> Iterator[dict[str, Any]]:
    if isinstance(schema, dict):
        yield schema
        for value in schema.values():
            yield from _walk(value)
    elif isinstance(schema, list):
        for item in schema:
            yield from _walk(item)


def test_vendored_schemas_name_their_source_and_are_real_crd_schemas() -> None:
    for kind in ("ServingRuntime", "InferenceService"):
        vendored = _vendored(kind)
        source = vendored["source"]
        assert source["repository"] == "https://github.com/kserve/kserve"
        assert len(source["commit"]) == 40 and source["path"].startswith("config/crd/")
        schema = vendored["openAPIV3Schema"]
        jsonschema.Draft4Validator.check_schema(schema)
        assert schema["properties"]["spec"]["properties"], kind
        # Big enough to be the real thing: a core Container schema at least.
        assert sum(1 for node in _walk(schema) if "properties" in node) > 50, kind

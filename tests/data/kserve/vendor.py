"""Vendor the parts of KServe's CRD schemas that k8s/kserve uses, for tests/test_deploy_kserve.py.

    python tests/data/kserve/vendor.py KSERVE_GIT_DIR [COMMIT]

reads each CRD below from a clone of https://github.com/kserve/kserve (`git show COMMIT:path`,
default HEAD) and writes `<kind>.schema.json` here: the CRD's openAPIV3Schema, with only the
properties that CRDS names, at the levels it names (everything below a kept property is kept
whole), and where it came from. A manifest that needs another field: add it to KEEP, re-run.
"""

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
REPOSITORY = "https://github.com/kserve/kserve"
CRDS = {
    "ServingRuntime": (
        "config/crd/full/serving.kserve.io_servingruntimes.yaml",
        "v1alpha1",
        {
            "spec": [
                "annotations", "containers", "disabled", "multiModel", "protocolVersions",
                "supportedModelFormats", "volumes",
            ],
        },
    ),
    "InferenceService": (
        "config/crd/full/serving.kserve.io_inferenceservices.yaml",
        "v1beta1",
        {
            "spec": ["predictor"],
            "spec.predictor": [
                "automountServiceAccountToken", "maxReplicas", "minReplicas", "model",
            ],
        },
    ),
}  # fmt: skip


def prune(schema: dict[str, Any], keep: dict[str, list[str]]) -> dict[str, Any]:
    """`schema` with only the kept properties at each dotted path of `keep`."""
    schema = json.loads(json.dumps(schema))
    for path, names in keep.items():
        node = schema
        for part in path.split("."):
            node = node["properties"][part]
        missing = set(names) - node["properties"].keys()
        if missing:
            raise SystemExit(f"{path} has no properties {sorted(missing)} in this KServe version")
        node["properties"] = {name: node["properties"][name] for name in names}
        node["required"] = [name for name in node.get("required", []) if name in names]
        if not node["required"]:
            del node["required"]
    return schema


def main(git_dir: str, commit: str = "HEAD") -> None:
    def git(*args: str) -> str:
        command = ["git", "--git-dir", git_dir, *args]
        return subprocess.run(command, check=True, capture_output=True, text=True).stdout

    resolved = git("rev-parse", f"{commit}^{{commit}}").strip()
    for kind, (path, version, keep) in CRDS.items():
        crd = yaml.safe_load(git("show", f"{resolved}:{path}"))
        served = next(v for v in crd["spec"]["versions"] if v["name"] == version)
        vendored = {
            "source": {"repository": REPOSITORY, "commit": resolved, "path": path, "kept": keep},
            "apiVersion": f"{crd['spec']['group']}/{version}",
            "kind": kind,
            "openAPIV3Schema": prune(served["schema"]["openAPIV3Schema"], keep),
        }
        target = HERE / f"{kind.lower()}.schema.json"
        target.write_text(json.dumps(vendored, indent=1, sort_keys=True) + "\n")
        print(f"{target.name}: {kind} {version} from {path} at {resolved[:12]}")


if __name__ == "__main__":
    main(*sys.argv[1:])

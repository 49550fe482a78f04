"""The layout is checked, not hoped for: import-linter's contracts (pyproject.toml) hold on the
tree, each kind of contract fails when a copy of the tree breaks it, and the entry side loads
without TensorFlow in a fresh interpreter."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"

# What `graft serve`'s entry process and the Python client import, gRPC included.
ENTRY_SIDE = (
    "service.app.entry",
    "service.app.serve",
    "service.protocol.grpc.server",
    "service.protocol.http.routes",
    "service.client",
    "graft_cli",
)
HEAVY = ("tensorflow", "keras", "tensorflow_serving")

# (file to append a line to, the line, the contract that must then be broken)
BREAKAGES = {
    "a lower room imports a higher one": (
        "service/store/repository.py",
        "import service.gateway.gateway",
        "Serving rooms: a room imports only the rooms below it",
    ),
    "HTTP imports gRPC": (
        "service/protocol/http/routes.py",
        "import service.protocol.grpc.classifier",
        "HTTP and gRPC front ends are independent",
    ),
    "the V2 room imports HTTP": (
        "service/protocol/v2/tensors.py",
        "import service.protocol.http.bodies",
        "HTTP and gRPC mount the Open Inference Protocol (v2), which imports neither",
    ),
    "the gateway imports TensorFlow": (
        "service/gateway/results.py",
        "import tensorflow",
        "The entry side and the model store never import TensorFlow",
    ),
    "the gateway reaches TensorFlow through the runtime": (
        "service/gateway/admission.py",
        "import service.runtime.batcher",
        "The entry side and the model store never import TensorFlow",
    ),
    "a shared module imports a room": (
        "service/wire.py",
        "import service.store.layout",
        "Shared modules import no room",
    ),
    "the client imports the gateway": (
        "service/client/inputs.py",
        "import service.gateway",
        "The Python client imports nothing of the server",
    ),
    "serving imports training": (
        "service/errors.py",
        "import training.default_model",
        "Serving never imports training",
    ),
    "two modules of one room import each other": (
        "service/gateway/results.py",
        "import service.gateway.gateway",  # which imports results
        "No import circles",
    ),
}


def _lint_imports(tree: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _copy_tree(target: Path) -> Path:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for package in ("service", "training"):
        shutil.copytree(ROOT / package, target / package, ignore=ignore)
    shutil.copy(ROOT / "pyproject.toml", target / "pyproject.toml")
    return target


def test_the_contracts_hold_on_the_tree() -> None:
    done = _lint_imports(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _copy_tree(tmp_path_factory.mktemp("pristine"))


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_breaking_a_contract_fails_the_lint(breakage: str, pristine: Path, tmp_path: Path) -> None:
    path, line, contract = BREAKAGES[breakage]
    tree = tmp_path / "tree"
    shutil.copytree(pristine, tree)
    with (tree / path).open("a") as module:
        module.write(f"\n{line}  # noqa\n")
    done = _lint_imports(tree)
    assert done.returncode != 0, f"lint-imports passed with {line!r} in {path}"
    assert f"{contract} BROKEN" in done.stdout, done.stdout


def test_the_entry_side_loads_without_tensorflow() -> None:
    code = (
        "import importlib, sys\n"
        f"for name in {ENTRY_SIDE!r}:\n"
        "    importlib.import_module(name)\n"
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", f"the entry side imported {done.stdout.strip()}"

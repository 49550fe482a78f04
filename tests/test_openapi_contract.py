"""/openapi.json is exact: a short, seeded schemathesis pass (every check, every route) against
a real `graft serve`, so the document and the server cannot drift apart.

Schema-valid requests must be accepted (except where only the image bytes are wrong, which no
JSON Schema can say: tests/data/schemathesis.toml), schema-invalid ones refused, every status
and content type the server answers documented, and no answer may be a 5xx.
"""

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.routing import Route
from support.server import RunningServer, running_server

from service.policy import PolicyAnswer, PolicyBody
from service.protocol.http.openapi import openapi_document
from service.protocol.http.routes import build_app
from service.wire import PromotionAnswer, PromotionBody

pytestmark = pytest.mark.slow
TESTS = Path(__file__).resolve().parent
TOKEN = "test-admin-token-0123456789"
SEED = "1"
EXAMPLES = "10"  # per operation and phase: about 900 requests, under a minute here


@pytest.fixture(scope="module")
def server(colour_model_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    # A copy: generated pins and pushes may change the repository.
    root = shutil.copytree(colour_model_root, tmp_path_factory.mktemp("contract") / "models")
    env = {"GRAFT_ADMIN_TOKEN": TOKEN}
    with running_server(root, default_model="colours", env=env) as running:
        yield running


def test_every_route_is_documented_with_its_methods() -> None:
    app = build_app(lambda: None)  # type: ignore[arg-type, return-value]
    served = {
        (re.sub(r"\{(\w+):\w+\}", r"{\1}", route.path), method.lower())
        for route in app.routes
        if isinstance(route, Route)
        for method in route.methods or ()
        if method != "HEAD"
    }
    documented = {
        (path, method) for path, item in openapi_document()["paths"].items() for method in item
    }
    assert served == documented


MANAGEMENT_BODIES = {  # route -> the models of its request body and of its 200 answer
    "/models/{name}/policy": (PolicyBody, PolicyAnswer),
    "/models/{name}/versions/{version}/promotion": (PromotionBody, PromotionAnswer),
}


@pytest.mark.parametrize("path", sorted(MANAGEMENT_BODIES))
def test_the_management_bodies_are_the_models_the_server_parses_and_answers(path: str) -> None:
    document = openapi_document()
    operation = document["paths"][path]["put"]
    documented = [
        operation["requestBody"]["content"]["application/json"]["schema"],
        operation["responses"]["200"]["content"]["application/json"]["schema"],
    ]
    for schema, model in zip(documented, MANAGEMENT_BODIES[path], strict=True):
        assert schema == {"$ref": f"#/components/schemas/{model.__name__}"}, path
        expected = model.model_json_schema(ref_template="#/components/schemas/{model}")
        expected.pop("$defs", None)
        assert document["components"]["schemas"][model.__name__] == expected


def test_schemathesis_finds_nothing(server: RunningServer, tmp_path: Path) -> None:
    cli = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    if cli is None:
        pytest.skip("schemathesis is not installed: pip install schemathesis")
    env = {
        **os.environ,
        "SCHEMATHESIS_HOOKS": "support.schemathesis_hooks",
        "PYTHONPATH": str(TESTS),
    }
    command = [
        cli, "--config-file", str(TESTS / "data" / "schemathesis.toml"),
        "run", f"{server.http}/openapi.json",
        "--checks", "all", "--seed", SEED, "--max-examples", EXAMPLES,
        "-H", f"Authorization: Bearer {TOKEN}", "--no-color",
    ]  # fmt: skip
    # cwd: schemathesis keeps a cache folder (.schemathesis/) in the working directory
    result = subprocess.run(
        command, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path
    )
    output = result.stdout[-12000:] + result.stderr[-2000:]
    assert result.returncode == 0, f"{output}\n--- server log:\n{server.log_tail(30)}"
    assert not re.search(r"\b5\d\d\b.*Internal", output)

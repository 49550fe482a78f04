#!/usr/bin/env bash
# Creates tests/.venv-kserve: KServe's Python package, whose Open Inference Protocol clients
# (InferenceRESTClient, InferenceGRPCClient) tests/test_v2_kserve_client.py runs in a
# subprocess against a real graft. A venv of its own because kserve pins protobuf < 7 and
# psutil < 6 (graft's venv has protobuf 7 and psutil 7), and apart from tritonclient's so that
# neither client's pins move the other's. Idempotent: reruns only fix what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV=tests/.venv-kserve
KSERVE_VERSION="${KSERVE_VERSION:-0.21.0}"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install --quiet --upgrade pip
# --no-compile: byte-compiling all of kserve's dependencies (kubernetes, pandas, ...) would
# take most of a minute; the check below compiles just what the tests import.
"$VENV/bin/pip" install --quiet --no-compile "kserve==${KSERVE_VERSION}"
env -u PYTHONDONTWRITEBYTECODE "$VENV/bin/python" -c 'import importlib.metadata as m
import kserve.protocol.rest.v2_datamodels
from kserve import InferenceGRPCClient, InferenceRESTClient
print("kserve", m.version("kserve"))'

#!/usr/bin/env bash
# Creates tests/.venv-tritonclient: NVIDIA's tritonclient (HTTP and gRPC), the Open Inference
# Protocol client that tests/test_v2_clients.py runs in subprocesses against a real graft.
# A venv of its own because tritonclient[grpc] pins protobuf < 7 and tritonclient[http]
# ml-dtypes <= 0.5.4 (graft's venv has protobuf 7), and because its protobuf messages
# (`inference.*`, registered as grpc_service.proto) clash with graft's copy of KServe's
# (grpc_predict_v2.proto) in one process. Idempotent: reruns only fix what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV=tests/.venv-tritonclient
TRITONCLIENT_VERSION="${TRITONCLIENT_VERSION:-2.73.0}"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install --quiet --upgrade pip
"$VENV/bin/pip" install --quiet "tritonclient[http,grpc]==${TRITONCLIENT_VERSION}"
"$VENV/bin/python" -c 'import importlib.metadata as m, tritonclient.grpc, tritonclient.http; print("tritonclient", m.version("tritonclient"))'

#!/usr/bin/env bash
# Creates bench/.venv-kserve: KServe's Python ModelServer + the same TensorFlow as graft.
# A venv of its own because kserve pins psutil<6 (graft's venv has psutil 7) and brings
# its own fastapi/uvicorn/protobuf ranges. Idempotent: reruns only fix what is missing.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON="${PYTHON:-python3}"
VENV=bench/.venv-kserve
KSERVE_VERSION="${KSERVE_VERSION:-0.21.0}"
TF_SPEC="$(.venv/bin/python -c 'import tensorflow as tf; print("tensorflow==" + tf.__version__)' 2>/dev/null || echo 'tensorflow>=2.21,<2.22')"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install --quiet --upgrade pip
"$VENV/bin/pip" install --quiet "kserve==${KSERVE_VERSION}" "$TF_SPEC"
# kserve 0.21 has no __version__: the installed version comes from the package metadata.
"$VENV/bin/python" -c 'import importlib.metadata as m, kserve, tensorflow as tf; print("kserve", m.version("kserve"), "tensorflow", tf.__version__)'

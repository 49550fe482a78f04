#!/bin/sh
# Entrypoint of the graft Bento's container (`bentoml containerize`): like `graft serve`, an
# empty model repository first gets the offline ImageNet default, then BentoML's own
# entrypoint serves the Bento (its arguments pass through unchanged).
set -eu
root="${GRAFT_MODEL_ROOT:?GRAFT_MODEL_ROOT must name the model repository}"
mkdir -p "$root"
cd "$BENTO_PATH/src"
python - "$root" <<'PY'
import sys
from pathlib import Path

from service.store.repository import ModelRepository

root = Path(sys.argv[1])
repository = ModelRepository(root)
if not repository.models():
    print(f"graft: {root} holds no model: installing the ImageNet default", flush=True)
    from training.default_model import create_default_model

    print(f"installed model 'imagenet' version {create_default_model(repository)}", flush=True)
PY
cd "$BENTO_PATH"
exec "$BENTO_PATH/env/docker/entrypoint.sh" "$@"

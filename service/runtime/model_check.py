"""Push gate 4, where TensorFlow lives: allowed ops only, then the serving runtime's own load
checks (which check the ops again, as every load does: service/runtime/graph_ops.py).

`check_model` loads the model in this process, so it runs in the inference process (which
already holds TensorFlow); the entry side reaches it through the inference service.
"""

import tempfile
from pathlib import Path

from service.runtime.graph_ops import refuse_unlisted_ops
from service.runtime.loaded_model import LoadedModel
from service.runtime.networks import Engine
from service.store.repository import ModelRepository


def check_model(folder: Path, name: str, engine: Engine = Engine()) -> None:
    """The TensorFlow gate: allowed ops, then the serving runtime's own load + warm-up checks,
    on `engine` (an accelerated file that disagrees with its SavedModel is refused here).

    Loads the model in this process: run it where TensorFlow already lives.
    """
    refuse_unlisted_ops(folder)  # before the export is even copied

    # Beside the export, i.e. inside a push's scratch folder: what a killed check leaves goes too.
    with tempfile.TemporaryDirectory(prefix=".check-", dir=folder.parent) as scratch:
        trial = ModelRepository(scratch)
        version = trial.publish(folder, name)
        LoadedModel.load(trial, name, version, engine)

"""Checks on an unpacked push that need no TensorFlow: layout, manifest hashes, content.

The manifest (graft.json, pydantic, JSON only) is read and the sha256 of every file checked
against it before any other file is opened as anything but bytes; then no Keras `Lambda` layer
configs are allowed (they carry marshalled Python bytecode that Keras would execute on load).
"""

import re
from pathlib import Path

from service.errors import RejectedModel
from service.store.layout import LABELS_FILE, MANIFEST_FILE, SAVED_MODEL_FILE, VARIABLES_INDEX_FILE
from service.store.manifest import Manifest, ManifestError, verify_dir
from service.units import MiB

_REQUIRED = (SAVED_MODEL_FILE, MANIFEST_FILE, LABELS_FILE, VARIABLES_INDEX_FILE)
_MAX_MANIFEST_BYTES = 4 * MiB
_KERAS_LAMBDA = re.compile(rb'"class_name"\s*:\s*"(?:[\w.]*\.)?Lambda"')


def check_contents(folder: Path) -> Manifest:
    """Layout, manifest hashes and content checks on an extracted export (no TensorFlow)."""
    missing = [path for path in _REQUIRED if not (folder / path).is_file()]
    if not any((folder / "variables").glob("variables.data-*")):
        missing.append("variables/variables.data-*")
    if missing:
        raise RejectedModel(
            f"the export lacks {', '.join(missing)}; push the folder `graft train` exported"
        )
    if (folder / MANIFEST_FILE).stat().st_size > _MAX_MANIFEST_BYTES:
        raise RejectedModel(f"{MANIFEST_FILE} is over {_MAX_MANIFEST_BYTES // MiB} MiB")
    try:
        manifest = verify_dir(folder)  # hashes every file against graft.json, then the labels
    except ManifestError as error:
        raise RejectedModel(f"manifest check failed: {error.message}") from None
    _refuse_keras_lambda(folder)
    return manifest


def _refuse_keras_lambda(folder: Path) -> None:
    for path in (folder / SAVED_MODEL_FILE, folder / MANIFEST_FILE):
        if _KERAS_LAMBDA.search(path.read_bytes()):
            raise RejectedModel(
                f"{path.name} contains a Keras Lambda layer config; Lambda layers carry Python "
                "bytecode and are refused. Replace them with built-in or registered layers."
            )

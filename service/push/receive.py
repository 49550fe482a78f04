"""Accepting a model push (a tar.gz of an export) as what it is: deploying code.

A push reaches the repository only after four gates, cheapest first, and every refusal is a
RejectedModel (422) that names the reason; nothing is published until all pass, so the serving
version is never touched by a rejected push.

1. Archive (`service.push.archive`): format, sizes, member names and the export layout.
2. Manifest (`service.push.checks`): graft.json and the sha256 of every file.
3. Content (`service.push.checks`): no Keras `Lambda` layer configs.
4. Model (optional, needs TensorFlow): the caller's `check_model`, in production
   `service.runtime.model_check.check_model` run in the inference process.
"""

import io
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from service.errors import InsufficientStorage
from service.push.archive import DISK_FULL, PushLimits, extract_archive, too_large
from service.push.checks import check_contents
from service.store.promotion import publish_candidate
from service.store.repository import ModelRepository, validate_name
from service.wire import Promotion

ModelCheck = Callable[[Path, str], None]


def receive_push(
    source: BinaryIO | bytes,
    *,
    name: str,
    repository: ModelRepository,
    limits: PushLimits,
    check_model: ModelCheck | None = None,
    promotion: Promotion | None = None,
) -> int:
    """Check a pushed tar.gz end to end and publish it as the next version of `name`
    (recorded with `promotion` before it appears, when given: service/store/promotion.py)."""
    validate_name(name)
    if isinstance(source, bytes) and len(source) > limits.max_compressed_bytes:
        raise too_large(limits.max_compressed_bytes)
    stream = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        with repository.scratch() as scratch:
            export_dir = scratch / "export"
            extract_archive(stream, export_dir, limits)
            check_contents(export_dir)
            if check_model is not None:
                check_model(export_dir, name)
            if promotion is not None:
                return publish_candidate(repository, export_dir, name, promotion)
            return repository.publish(export_dir, name)
    except OSError as error:
        if error.errno in DISK_FULL:
            raise InsufficientStorage(
                f"no space left to store the model ({error.strerror}); nothing was published: "
                "free space under the model root, then push again"
            ) from None
        raise

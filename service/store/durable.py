"""Durable writes: a file or a directory entry that survives a crash or a power cut once written."""

import os
import uuid
from pathlib import Path


def write_durably(path: Path, data: bytes) -> None:
    """Replace `path` atomically: readers see the old content or the new, never a torn file."""
    temporary = path.with_name(f".staging-{uuid.uuid4().hex}-{path.name}")
    try:
        with temporary.open("xb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    """Make a directory's entries (a new file, a rename) durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

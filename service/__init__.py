"""graft's serving side, in rooms by job: protocol -> gateway -> wire -> app -> runtime -> store
(docs/architecture.md)."""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _dist_version

from service.tfenv import quiet_tensorflow

quiet_tensorflow()

try:
    __version__ = _dist_version("graft-serve")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+local"

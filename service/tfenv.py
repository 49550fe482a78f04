"""Quiet TensorFlow's start-up chatter without hiding its real warnings.

Two kinds of noise reach a user who did not ask for them: INFO logs (oneDNN and CPU-feature
notices), which TF_CPP_MIN_LOG_LEVEL=1 drops, and lines that TensorFlow's CUDA stub writes
straight to file descriptor 2 before any log level applies ("Could not find cuda drivers",
"failed call to cuInit"). The second kind can only be filtered at the file descriptor, so the
first `import tensorflow` runs with fd 2 captured and every line that is not known noise is
written back. Setting TF_CPP_MIN_LOG_LEVEL=0 turns all of this off.
"""

import importlib.abc
import importlib.machinery
import os
import re
import sys
import tempfile
from types import ModuleType

_NOISE = re.compile(
    r"All log messages before absl::InitializeLog|cudart_stub\.cc|cuda_platform\.cc.*cuInit"
    r"|cpu_feature_guard\.cc|To enable the following instructions|oneDNN custom operations"
)


class _FilteredStderr:
    """Capture fd 2 for a block, then re-emit the lines that are not known noise."""

    def __enter__(self) -> None:
        sys.stderr.flush()
        self._saved = os.dup(2)
        self._capture = tempfile.TemporaryFile()
        os.dup2(self._capture.fileno(), 2)

    def __exit__(self, *exc: object) -> None:
        sys.stderr.flush()
        os.dup2(self._saved, 2)
        os.close(self._saved)
        self._capture.seek(0)
        for line in self._capture.read().decode(errors="replace").splitlines(keepends=True):
            if not _NOISE.search(line):
                sys.stderr.write(line)
        self._capture.close()


class _QuietLoader(importlib.abc.Loader):
    def __init__(self, real: importlib.abc.Loader) -> None:
        self._real = real

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._real.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        with _FilteredStderr():
            self._real.exec_module(module)
            # Device discovery (cuInit) is lazy; do it now, while the noise is still filtered.
            module.config.list_physical_devices()


class _QuietTensorFlowFinder(importlib.abc.MetaPathFinder):
    def find_spec(
        self, fullname: str, path: object, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != "tensorflow":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader)
        return spec


_OURS = "GRAFT_QUIET_TENSORFLOW"  # marks a log level graft chose, so child processes filter too


def quiet_tensorflow() -> None:
    """Set quiet defaults; a user's own TF_CPP_MIN_LOG_LEVEL always wins."""
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    user_chose = "TF_CPP_MIN_LOG_LEVEL" in os.environ and _OURS not in os.environ
    if user_chose or "tensorflow" in sys.modules:
        return
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "1"
    os.environ[_OURS] = "1"
    if not any(isinstance(f, _QuietTensorFlowFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietTensorFlowFinder())

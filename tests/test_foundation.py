"""The project installs, imports, and keeps TensorFlow quiet without hiding real warnings."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**clean, **env},
        timeout=120,
        check=True,
    )


def test_packages_import() -> None:
    import service
    import training

    assert training.__doc__ and service.__version__


def test_graft_cli_lists_commands() -> None:
    graft = shutil.which("graft", path=str(Path(sys.executable).parent))
    assert graft, "the console script `graft` is not installed"
    out = subprocess.run([graft, "--help"], capture_output=True, text=True, check=True).stdout
    assert "version" in out


def test_tensorflow_startup_noise_is_filtered_but_warnings_stay() -> None:
    result = _python(
        "import warnings, training, tensorflow as tf; tf.constant(1) + 1;"
        " warnings.warn('a real warning')"
    )
    assert "cuda" not in result.stderr.lower()
    assert "absl::InitializeLog" not in result.stderr
    assert "a real warning" in result.stderr


def test_user_log_level_brings_the_full_log_back() -> None:
    result = _python(
        "import training, tensorflow as tf; tf.constant(1) + 1", TF_CPP_MIN_LOG_LEVEL="0"
    )
    assert "cpu_feature_guard" in result.stderr or "cuda" in result.stderr.lower()


def test_child_processes_of_graft_filter_too() -> None:
    """graft sets TF_CPP_MIN_LOG_LEVEL itself; a worker process it spawns must still filter."""
    code = (
        "import os, subprocess, sys, training;"
        "child = 'import service, tensorflow as tf; tf.constant(1)';"
        "r = subprocess.run([sys.executable, '-c', child],"
        " capture_output=True, text=True);"
        "sys.stderr.write(r.stderr)"
    )
    result = _python(code)
    assert "cuda" not in result.stderr.lower()

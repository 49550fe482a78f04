"""What a benchmark run measures and for how long: the full profile and the quick one."""

import os
from dataclasses import dataclass, replace
from pathlib import Path

from bench.images import REPO_ROOT

BENCH_DIR = REPO_ROOT / "bench"
# gitignored: raw JSON, server logs, scratch repositories; GRAFT_BENCH_RESULTS puts a trial
# run (or a sweep) elsewhere, so it cannot overwrite the figures of the last real run
RESULTS_DIR = Path(os.environ.get("GRAFT_BENCH_RESULTS") or BENCH_DIR / "results")
PLOTS_DIR = REPO_ROOT / "docs" / "bench"  # committed: the PNGs BENCHMARKS.md shows
BENCHMARKS_MD = REPO_ROOT / "BENCHMARKS.md"
VENV_BIN = REPO_ROOT / ".venv" / "bin"
KSERVE_PYTHON = BENCH_DIR / ".venv-kserve" / "bin" / "python"

# In run order. Sections that share a server (the four graft ones) share one start-up.
SECTIONS = (
    "loadgen",  # calibration: how fast the load generator can go, and its CPU per request
    "ceiling",  # in-process, per runtime: decode + network on batches (bench/ceiling.py)
    "graft-http",
    "graft-v2",  # Open Inference Protocol REST, binary tensor data, right after graft-http
    "graft-grpc",
    "switch",  # version published during a concurrency-16 run
    "graft-nobatch",  # GRAFT_MAX_BATCH_SIZE=1
    "tutorial",  # bench/peers/tutorial_app.py: the SavedModel's serving_default
    "tutorial-onnx",  # bench/peers/tutorial_onnx_app.py: preprocess + the ONNX network
    "kserve",  # KServe ModelServer, bench/peers/kserve_model.py
    "training",  # bench/training_bench.py (the training engineer's)
    "gpu",  # graft on an NVIDIA GPU, only where one is visible (bench/gpu.py)
)
QUICK_SKIPS = ("training",)  # minutes of training do not fit in `--quick`'s 3 minutes
# The servers graft is compared with (each target "ahead of every peer" reads these).
PEERS = ("tutorial", "tutorial-onnx", "kserve")
SERVER_LABELS = {  # section -> how tables and plots name it
    "graft-http": "graft HTTP",
    "graft-grpc": "graft gRPC",
    "graft-v2": "graft V2 REST (binary)",
    "graft-nobatch": "graft HTTP, batching off",
    "tutorial": "tutorial FastAPI (TensorFlow)",
    "tutorial-onnx": "tutorial FastAPI (ONNX Runtime)",
    "kserve": "KServe ModelServer",
}


@dataclass(frozen=True)
class Profile:
    levels: tuple[int, ...]  # closed-loop concurrency levels
    warmup_s: float
    duration_s: float
    images: int  # distinct photos sent, round-robin over the class folders
    ceiling_batches: tuple[int, ...]
    ceiling_callers: tuple[int, ...]  # threads calling the model at once, each on its batches
    ceiling_duration_s: float
    ceiling_runtimes: str  # "all": every runtime installed here; "default": TF + graft's auto
    open_fractions: tuple[float, ...]  # open-loop rates, as fractions of the ceiling
    switch_duration_s: float
    peer_levels: tuple[int, ...]  # levels for graft-nobatch, tutorial and kserve
    peer_open_loop: bool  # open-loop runs for the tutorial and KServe peers too
    switch_at: float = 0.35  # publish the new version this far into the switch window

    def with_durations(self, warmup_s: float | None, duration_s: float | None) -> "Profile":
        return replace(
            self,
            warmup_s=self.warmup_s if warmup_s is None else warmup_s,
            duration_s=self.duration_s if duration_s is None else duration_s,
        )


FULL = Profile(
    levels=(1, 4, 16, 64),
    warmup_s=5.0,
    duration_s=20.0,
    images=256,
    ceiling_batches=(1, 4, 16, 32),
    ceiling_callers=(1, 2),
    ceiling_duration_s=10.0,
    ceiling_runtimes="all",
    open_fractions=(0.5, 0.8),
    switch_duration_s=45.0,
    peer_levels=(1, 4, 16, 64),
    peer_open_loop=True,
)
QUICK = Profile(
    levels=(1, 16),
    warmup_s=1.0,
    duration_s=3.0,
    images=48,
    ceiling_batches=(1, 4),
    ceiling_callers=(1, 2),
    ceiling_duration_s=2.0,
    ceiling_runtimes="default",
    open_fractions=(0.5,),
    switch_duration_s=18.0,
    peer_levels=(16,),  # what the targets compare; keeps --quick under 3 minutes
    peer_open_loop=False,
)

"""GRAFT_DEVICE: the processor the network runs on, chosen once at start.

`auto` takes the first NVIDIA GPU this process may use, else the CPU; `gpu` / `gpu:N` must
exist or `graft serve` refuses to start. GPUs are found without importing a GPU library (the
entry process stays light): the /dev/nvidiaN nodes the driver (or the NVIDIA container
runtime) creates, narrowed by CUDA_VISIBLE_DEVICES as CUDA itself does.
"""

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CGROUP = Path("/sys/fs/cgroup")  # where a container's CPU limit shows

CPU = "cpu"
GPU = "gpu"
DEVICES = ("auto", CPU, GPU, "gpu:N")
_SETTING = re.compile(r"^(auto|cpu|gpu)(?::(\d{1,3}))?$")
_NODE = re.compile(r"^nvidia\d+$")

# Batching per device. CPU: measured on 2 cores (decision 34, re-tuned in BENCHMARKS.md). GPU:
# a batch costs nearly the same at 1 and 32 images, so wait up to 2 ms to fill bigger ones;
# two batches in flight keep the GPU busy while the CPU decodes the next (not yet measured on
# a GPU: BENCHMARKS.md says so).
BATCHING = {
    CPU: {},
    GPU: {"max_batch_size": 32, "batch_timeout_ms": 2.0, "batch_threads": 2},
}


class DeviceUnavailable(RuntimeError):
    """GRAFT_DEVICE names a device this machine does not have."""


@dataclass(frozen=True)
class Device:
    kind: str = CPU
    index: int = 0

    def __str__(self) -> str:
        return CPU if self.kind == CPU else f"{GPU}:{self.index}"


def decode_threads_default(device: Device) -> int:
    """GRAFT_DECODE_THREADS=auto on `device` (service.runtime.decode_pool): on a GPU every core
    decodes while the GPU runs the network; on the CPU the network needs the same cores, and a
    pool of 2 on 2 cores cost the same CPU per image as one `preprocess` call per batch, with
    less throughput (BENCHMARKS.md), so 1."""
    return usable_cores() if device.kind == GPU else 1


def usable_cores(cgroup: Path = CGROUP) -> int:
    """The cores this process may use: its CPU affinity, capped by a cgroup CPU quota (a
    container's CPU limit, which the affinity does not show: a pod limited to 8 CPUs on a
    64-core node sees 64)."""
    cores = len(os.sched_getaffinity(0))
    quota = _cpu_quota(cgroup)
    return max(1, min(cores, math.ceil(quota))) if quota else cores


def _cpu_quota(cgroup: Path) -> float | None:
    """CPUs' worth of quota from cgroup v2 (`cpu.max`: "max 100000" or "800000 100000") or v1
    (`cpu/cpu.cfs_quota_us` / `cpu.cfs_period_us`, -1 for none); None without a quota."""
    try:
        if (v2 := cgroup / "cpu.max").is_file():
            quota, period = v2.read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        if (v1 := cgroup / "cpu" / "cpu.cfs_quota_us").is_file():
            quota_us = int(v1.read_text())
            period_us = int((cgroup / "cpu" / "cpu.cfs_period_us").read_text())
            return quota_us / period_us if quota_us > 0 else None
    except (OSError, ValueError, ZeroDivisionError):
        return None
    return None


def visible_gpus(dev: Path = Path("/dev"), environ: Mapping[str, str] = os.environ) -> int:
    """How many NVIDIA GPUs this process may use."""
    try:
        nodes = sum(1 for entry in os.scandir(dev) if _NODE.match(entry.name))
    except OSError:
        return 0
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return nodes
    # CUDA stops enumerating at the first invalid entry ("-1" hides every GPU).
    listed = 0
    for entry in visible.split(","):
        if not entry.strip() or entry.strip().startswith("-"):
            break
        listed += 1
    return min(nodes, listed)


def resolve_device(setting: str, gpus: int | None = None) -> Device:
    """The device `GRAFT_DEVICE=setting` means here; DeviceUnavailable (one line) otherwise."""
    match = _SETTING.match(setting.strip().lower())
    if match is None or (match[2] is not None and match[1] != GPU):
        raise DeviceUnavailable(
            f"GRAFT_DEVICE={setting[:40]!r} is not a device; use auto, cpu, gpu or gpu:N"
        )
    count = visible_gpus() if gpus is None else gpus
    kind, index = match[1], int(match[2] or 0)
    if kind == "auto":
        return Device(GPU, 0) if count else Device(CPU)
    if kind == CPU:
        return Device(CPU)
    if index >= count:
        seen = f"{count} visible GPU{'s' if count != 1 else ''}" if count else "no visible GPU"
        raise DeviceUnavailable(
            f"GRAFT_DEVICE={setting} but this machine has {seen} (/dev/nvidia*, "
            "CUDA_VISIBLE_DEVICES); use GRAFT_DEVICE=auto or cpu"
        )
    return Device(GPU, index)


def batching_defaults(device: Device, chosen: set[str]) -> dict[str, Any]:
    """The batching settings `device` wants, except those the user set (`chosen`)."""
    return {key: value for key, value in BATCHING[device.kind].items() if key not in chosen}


def grow_gpu_memory() -> None:
    """Let TensorFlow take GPU memory as it needs it instead of all of it at its first op,
    so that ONNX Runtime's CUDA provider, a second model and the training job fit beside it.
    Must run before TensorFlow touches a GPU; without a GPU it does nothing."""
    import tensorflow as tf

    for gpu in tf.config.list_physical_devices("GPU"):
        tf.config.experimental.set_memory_growth(gpu, True)

"""GRAFT_DEVICE: finding GPUs, refusing ones that are not there, batching per device, and a
device that runs out of memory on a batch.

This machine has no GPU: the GPU-only paths are checked through what graft decides (device,
runtime, defaults) and, for out-of-memory, through a real network whose calls above a batch
size fail the way ONNX Runtime's CUDA allocator does (an injected failure).
"""

import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from support.cli import run_graft
from support.exports import make_tiny_export

from service.runtime.devices import (
    CPU,
    GPU,
    Device,
    DeviceUnavailable,
    batching_defaults,
    resolve_device,
    visible_gpus,
)
from service.runtime.networks import ONNXRUNTIME, Engine, RuntimeUnavailable, resolve
from service.store.repository import ModelRepository
from service.wire import InferItem


def _dev_with(tmp_path: Path, *names: str) -> Path:
    for name in names:
        (tmp_path / name).touch()
    return tmp_path


def test_gpus_are_the_nvidia_device_nodes_narrowed_by_cuda_visible_devices(
    tmp_path: Path,
) -> None:
    dev = _dev_with(tmp_path, "nvidia0", "nvidia1", "nvidiactl", "nvidia-uvm", "null")
    assert visible_gpus(dev, {}) == 2
    assert visible_gpus(dev, {"CUDA_VISIBLE_DEVICES": "1"}) == 1
    assert visible_gpus(dev, {"CUDA_VISIBLE_DEVICES": ""}) == 0
    assert visible_gpus(dev, {"CUDA_VISIBLE_DEVICES": "0,-1,1"}) == 1  # CUDA stops at -1
    assert visible_gpus(dev, {"CUDA_VISIBLE_DEVICES": "0,1,2,3"}) == 2
    assert visible_gpus(tmp_path / "missing", {}) == 0


def test_auto_takes_the_first_gpu_else_the_cpu() -> None:
    assert resolve_device("auto", gpus=0) == Device(CPU)
    assert resolve_device("auto", gpus=2) == Device(GPU, 0)
    assert resolve_device("gpu:1", gpus=2) == Device(GPU, 1)
    assert str(resolve_device("GPU", gpus=1)) == "gpu:0"
    assert str(resolve_device("cpu", gpus=1)) == "cpu"


@pytest.mark.parametrize(
    ("setting", "gpus", "message"),
    [
        ("gpu", 0, "GRAFT_DEVICE=gpu but this machine has no visible GPU"),
        ("gpu:7", 1, "GRAFT_DEVICE=gpu:7 but this machine has 1 visible GPU "),
        ("tpu", 1, "GRAFT_DEVICE='tpu' is not a device"),
        ("cpu:1", 1, "GRAFT_DEVICE='cpu:1' is not a device"),
        ("gpu:99999", 1, "GRAFT_DEVICE='gpu:99999' is not a device"),
    ],
)
def test_devices_that_are_not_there_are_refused(setting: str, gpus: int, message: str) -> None:
    with pytest.raises(DeviceUnavailable) as caught:
        resolve_device(setting, gpus=gpus)
    assert str(caught.value).startswith(message)


def test_a_runtime_without_a_gpu_build_is_refused_on_a_gpu() -> None:
    import onnxruntime

    assert "CUDAExecutionProvider" not in onnxruntime.get_available_providers()  # CPU build
    with pytest.raises(RuntimeUnavailable, match="has no CUDA provider"):
        resolve(ONNXRUNTIME, Device(GPU, 0))
    with pytest.raises(RuntimeUnavailable, match="OpenVINO on the CPU only"):
        resolve("openvino", Device(GPU, 0))
    assert resolve("auto", Device(GPU, 0)) == "tensorflow"  # TensorFlow's own GPU build
    assert resolve("auto", Device(CPU)) == ONNXRUNTIME


def test_batching_defaults_follow_the_device_unless_the_user_chose() -> None:
    assert batching_defaults(Device(CPU), set()) == {}
    gpu = batching_defaults(Device(GPU, 0), set())
    assert gpu["max_batch_size"] > 4 and gpu["batch_timeout_ms"] > 0
    assert "max_batch_size" not in batching_defaults(Device(GPU, 0), {"max_batch_size"})


def test_graft_serve_refuses_a_gpu_it_does_not_have(tmp_path: Path) -> None:
    result = run_graft("serve", "--model-root", str(tmp_path), env={"GRAFT_DEVICE": "gpu:7"})
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: GRAFT_DEVICE=gpu:7 but this machine has no visible GPU (/dev/nvidia*, "
        "CUDA_VISIBLE_DEVICES); use GRAFT_DEVICE=auto or cpu"
    ]


class _OutOfMemoryAbove:
    """A real network whose calls on more than `limit` images fail as CUDA's allocator does."""

    def __init__(self, network: object, limit: int) -> None:
        self.runtime = network.runtime  # type: ignore[attr-defined]
        self._network = network
        self._limit = limit
        self.calls: list[int] = []

    def run(self, pixels: np.ndarray) -> np.ndarray:
        self.calls.append(len(pixels))
        if len(pixels) > self._limit:
            raise RuntimeError(
                "[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code returned "
                "while running Conv node. CUDA failure 2: out of memory"
            )
        return self._network.run(pixels)  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def tiny_repository(tmp_path_factory: pytest.TempPathFactory) -> ModelRepository:
    root = tmp_path_factory.mktemp("oom")
    repository = ModelRepository(root / "models")
    repository.publish(make_tiny_export(root / "export"), "tiny")
    return repository


def _run_with_limit(repository: ModelRepository, limit: int, images: list[bytes]):
    from service.runtime.batch_runner import run_batch
    from service.runtime.loaded_model import LoadedModel
    from service.runtime.versions import VersionManager

    model = LoadedModel.load(repository, "tiny", 1, Engine(ONNXRUNTIME, 1))
    failing = _OutOfMemoryAbove(model._network, limit)
    manager = VersionManager(repository, 60, loader=lambda *_: replace(model, _network=failing))
    manager.poll_once()
    items = [InferItem(model="tiny", image=image, enqueued_at=time.time()) for image in images]
    return model, failing, run_batch(manager, items)


def test_a_batch_that_runs_out_of_memory_is_retried_in_smaller_batches(
    tiny_repository: ModelRepository,
) -> None:
    from service.runtime.loaded_model import _warmup_images

    images = _warmup_images(32) * 3  # 9 images
    model, failing, results = _run_with_limit(tiny_repository, 2, images)
    assert all(r.error_code is None for r in results)
    got = np.stack([np.frombuffer(r.probabilities, np.float32) for r in results])
    np.testing.assert_allclose(got, model.predict(images), atol=1e-5)
    assert failing.calls[0] == 9  # one batch first, then halves until they fit
    assert sum(n for n in failing.calls if n <= 2) == 9  # each image ran once, in a batch <= 2


def test_an_image_that_cannot_run_alone_gets_a_503_and_the_others_their_answers(
    tiny_repository: ModelRepository,
) -> None:
    from service import metrics
    from service.runtime.loaded_model import _warmup_images

    before = metrics.OUT_OF_MEMORY.labels("tiny", "1")._value.get()
    _, _, results = _run_with_limit(tiny_repository, 0, _warmup_images(32)[:2])
    assert [r.error_code for r in results] == ["device_out_of_memory"] * 2
    assert "ran cpu out of memory on this image alone" in (results[0].error or "")
    assert metrics.OUT_OF_MEMORY.labels("tiny", "1")._value.get() > before

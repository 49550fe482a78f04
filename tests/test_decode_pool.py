"""The decode pool (GRAFT_DECODE_THREADS): a batch's images decoded in parallel, each chunk by
the version's own `preprocess` signature, with the serial path's numbers.

Real tiny exports (support.exports) on ONNX Runtime, real photos from scikit-image of different
sizes and formats, the real `graft serve` for the start-up line and the refusals.
"""

import io
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from support.bad_images import truncated_jpeg
from support.cli import run_graft
from support.exports import make_tiny_export

from service.runtime.batch_runner import run_batch
from service.runtime.decode_pool import DecodeSettingError, resolve_decode_threads, shared_pool
from service.runtime.devices import CPU, GPU, Device, decode_threads_default, usable_cores
from service.runtime.loaded_model import LoadedModel
from service.runtime.networks import ONNXRUNTIME, Engine, engine_for
from service.runtime.versions import VersionManager
from service.settings import GraftSettings
from service.store.repository import ModelRepository
from service.wire import InferItem

CORES = len(os.sched_getaffinity(0))


def _engine(decode_threads: int) -> Engine:
    return Engine(ONNXRUNTIME, 1, Device(CPU), decode_threads)


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> ModelRepository:
    root = tmp_path_factory.mktemp("decode-pool")
    repository = ModelRepository(root / "models")
    repository.publish(make_tiny_export(root / "export"), "tiny")
    return repository


@pytest.fixture(scope="module")
def photos() -> list[bytes]:
    """Seven real photos of different sizes, as JPEG, PNG and a grayscale JPEG."""
    from skimage import data

    sources = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket(), data.camera()]
    sizes = [(512, 512), (451, 300), (600, 400), (640, 427), (512, 512), (97, 211), (33, 40)]
    out = []
    for index, size in enumerate(sizes):
        image = Image.fromarray(sources[index % len(sources)]).resize(size)
        buffer = io.BytesIO()
        image.save(buffer, "PNG" if index % 3 == 1 else "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def test_pooled_decoding_gives_the_serial_pixels_and_runs_on_the_pool(
    repository: ModelRepository, photos: list[bytes]
) -> None:
    serial = LoadedModel.load(repository, "tiny", 1, _engine(1))
    pooled = LoadedModel.load(repository, "tiny", 1, _engine(3))
    assert (serial.runtime, pooled.runtime) == (ONNXRUNTIME, ONNXRUNTIME)
    threads: list[str] = []

    def recorded(chunk: list[bytes]) -> np.ndarray:
        threads.append(threading.current_thread().name)
        return pooled._pixels(chunk)

    pixels = pooled._decoder.decode(recorded, photos)
    assert np.array_equal(pixels, serial.decode(photos))  # bit-identical, in order
    assert len(threads) == 3 and all(name.startswith("graft-decode") for name in threads)
    assert np.array_equal(pooled.predict(photos), serial.predict(photos))


def test_the_pool_size_follows_the_setting_and_the_device(
    repository: ModelRepository, tmp_path: Path
) -> None:
    assert resolve_decode_threads("auto", Device(CPU)) == decode_threads_default(Device(CPU)) == 1
    assert resolve_decode_threads("auto", Device(GPU, 0)) == usable_cores() <= CORES
    assert resolve_decode_threads(" 5 ", Device(GPU, 0)) == 5
    settings = GraftSettings(model_root=tmp_path, runtime="onnxruntime", decode_threads="2")
    assert engine_for(settings).decode_threads == 2
    assert engine_for(GraftSettings(model_root=tmp_path, device="cpu")).decode_threads == 1
    model = LoadedModel.load(repository, "tiny", 1, _engine(2))
    assert model._decoder is shared_pool(2) and model._decoder.threads == 2
    # every version and batch of a process shares one pool per size: no threads per model
    assert LoadedModel.load(repository, "tiny", 1, _engine(2))._decoder is model._decoder


def test_a_containers_cpu_limit_caps_the_cores(tmp_path: Path) -> None:
    """Affinity shows every core of the node; the cgroup's quota is what a pod may use."""
    assert usable_cores(tmp_path) == CORES  # no cgroup files: no quota
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert usable_cores(tmp_path) == CORES
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # 1.5 CPUs: 2 threads keep it busy
    assert usable_cores(tmp_path) == min(2, CORES)
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("50000\n")  # cgroup v1, half a CPU
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert usable_cores(tmp_path) == 1
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert usable_cores(tmp_path) == CORES


def test_the_network_threads_share_the_cores_a_containers_cpu_limit_allows(tmp_path: Path) -> None:
    from service.runtime.networks import default_threads

    assert default_threads(1, tmp_path) == CORES
    (tmp_path / "cpu.max").write_text("100000 100000\n")  # one CPU, whatever the affinity
    assert default_threads(1, tmp_path) == 1
    assert default_threads(3, tmp_path) == 1  # never fewer than one thread a call


@pytest.mark.parametrize("setting", ["0", "-1", "many", "1.5", "99999", "3" * 40])
def test_bad_settings_are_refused_naming_the_setting(setting: str) -> None:
    with pytest.raises(DecodeSettingError, match=r"^GRAFT_DECODE_THREADS=.* is not a thread count"):
        resolve_decode_threads(setting, Device(CPU))


def test_a_bad_image_in_a_pooled_batch_fails_only_itself(
    repository: ModelRepository, photos: list[bytes]
) -> None:
    manager = VersionManager(repository, poll_interval_s=60, engine=_engine(3))
    manager.poll_once()
    assert manager.get("tiny")._decoder.threads == 3
    images = [*photos[:3], truncated_jpeg(), *photos[3:]]
    now = time.time()
    results = run_batch(
        manager, [InferItem(model="tiny", image=i, enqueued_at=now) for i in images]
    )
    assert [r.error_code for r in results] == [None] * 3 + ["invalid_image"] + [None] * 4
    reference = LoadedModel.load(repository, "tiny", 1, _engine(1)).predict(photos)
    answered = np.stack([r.array() for r in results[:3] + results[4:]])
    # the halves run the network at other batch sizes: the same numbers up to float rounding
    np.testing.assert_allclose(answered, reference, rtol=0, atol=1e-6)


def test_graft_serve_shows_the_decode_threads_and_refuses_a_bad_value_in_one_line(
    tmp_path: Path,
) -> None:
    bad = run_graft("serve", "--model-root", str(tmp_path), env={"GRAFT_DECODE_THREADS": "0"})
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines() == [
        "error: GRAFT_DECODE_THREADS='0' is not a thread count; use auto (every core on a GPU, "
        "1 on the CPU) or a number from 1 to 1024"
    ]
    # An empty single-model folder stops `graft serve` right after the start-up line.
    shown = run_graft(
        "serve",
        "--model-root",
        str(tmp_path),
        "--model-name",
        "absent",
        env={"GRAFT_DECODE_THREADS": "2", "GRAFT_RUNTIME": "onnxruntime", "GRAFT_DEVICE": "cpu"},
    )
    assert shown.returncode == 1
    assert "images decoded on 2 threads" in shown.stderr.splitlines()[0]

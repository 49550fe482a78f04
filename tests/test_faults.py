"""Faults: a full disk while publishing, overload, deadlines and clients that go away.

The disk-full tests run the real repository and push code against a real 512 KiB tmpfs (in a
private mount namespace, when the kernel allows one) and, everywhere, with ENOSPC injected at
the file-copy step. The overload tests run a real `graft serve` with a 4-image queue and a 3 s
deadline; the queue is held by a request to a paused (SIGSTOP) model worker, which keeps it
admitted for exactly its deadline on any machine, and clients give up in the middle of a slow
request: four 36-megapixel PNGs, seconds of decode.
"""

import errno
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from PIL import Image
from support.exports import make_tiny_export
from support.images import encode
from support.server import (
    RunningServer,
    images_in_flight,
    paused_inference,
    running_server,
    wait_for_images_in_flight,
)

from service.errors import InsufficientStorage
from service.push.archive import PushLimits, pack_export
from service.push.receive import receive_push
from service.store import repository as repository_module
from service.store.manifest import Manifest, hash_tree
from service.store.repository import STAGING_PREFIX, ModelRepository
from service.stubs.graft.v1 import classifier_pb2 as pb
from service.stubs.graft.v1 import classifier_pb2_grpc as pb_grpc


@pytest.fixture(scope="module")
def small_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_export(tmp_path_factory.mktemp("faults") / "export")


@pytest.fixture(scope="module")
def big_export(small_export: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small export with a 1 MiB (incompressible) weights shard, manifest rehashed."""
    folder = tmp_path_factory.mktemp("big") / "export"
    shutil.copytree(small_export, folder)
    shard = next((folder / "variables").glob("variables.data-*"))
    shard.write_bytes(np.random.default_rng(0).bytes(1024 * 1024))
    Manifest.read(folder).model_copy(update={"files": hash_tree(folder)}).write(folder)
    return folder


def staging_left(repository: ModelRepository) -> list[str]:
    staging = [p.name for p in repository.root.rglob(f"{STAGING_PREFIX}*")]
    return staging + [p.name for p in repository.scratch_folders()]


# -- disk full ----------------------------------------------------------------------------------

TMPFS_SCRIPT = """
import json, subprocess, sys
from pathlib import Path
from service.errors import InsufficientStorage
from service.push.archive import PushLimits, pack_export
from service.push.receive import receive_push
from service.store.repository import ModelRepository, STAGING_PREFIX

disk, small, big = (Path(p) for p in sys.argv[1:4])
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(disk)], check=True)
repository = ModelRepository(disk / "models")
report = {"first": repository.publish(small, "m")}
try:
    repository.publish(big, "m")
except OSError as error:
    report["publish_errno"] = error.errno
report["after_publish"] = repository.versions("m")
try:
    receive_push(pack_export(big), name="m", repository=repository, limits=PushLimits())
except InsufficientStorage as error:
    report["push_error"] = [error.http_status, error.message]
report["left"] = [p.name for p in disk.rglob(f"{STAGING_PREFIX}*")]
report["left"] += [p.name for p in repository.scratch_folders()]
report["next"] = repository.publish(small, "m")
report["final"] = repository.versions("m")
repository.verify("m", report["next"])
print(json.dumps(report))
"""


def _private_mounts_work() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = ["unshare", "-rm", "mount", "-t", "tmpfs", "tmpfs", "/mnt"]
    return subprocess.run(probe, capture_output=True).returncode == 0


@pytest.mark.skipif(not _private_mounts_work(), reason="no private mount namespace for a tmpfs")
def test_disk_full_on_a_real_tmpfs(small_export: Path, big_export: Path, tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()
    command = ["unshare", "-rm", sys.executable, "-c", TMPFS_SCRIPT]
    done = subprocess.run(
        [*command, str(disk), str(small_export), str(big_export)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["first"] == 1
    assert report["publish_errno"] == errno.ENOSPC
    assert report["after_publish"] == [1]
    status, message = report["push_error"]
    assert status == 507 and "nothing was published" in message
    assert report["left"] == [], "staging or scratch folders left on the full disk"
    assert report["final"] == [1, report["next"]]


def test_disk_full_by_injection(
    small_export: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC from the third file copied, after part of it was written."""
    repository = ModelRepository(tmp_path / "models")
    assert repository.publish(small_export, "m") == 1
    real_copy = repository_module._copy_file
    copies = {"count": 0}

    def filling_disk(source: Path, target: Path) -> str:
        copies["count"] += 1
        if copies["count"] == 3:
            target.write_bytes(source.read_bytes()[:10])
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_copy(source, target)

    monkeypatch.setattr(repository_module, "_copy_file", filling_disk)
    with pytest.raises(OSError) as caught:
        repository.publish(small_export, "m")
    assert caught.value.errno == errno.ENOSPC
    copies["count"] = 0
    with pytest.raises(InsufficientStorage, match="nothing was published"):
        receive_push(
            pack_export(small_export),
            name="m",
            repository=repository,
            limits=PushLimits(),
        )
    assert staging_left(repository) == []
    assert repository.versions("m") == [1]
    monkeypatch.undo()
    assert repository.publish(small_export, "m") == 2
    repository.verify("m", 2)


# -- overload, deadlines, disconnects -----------------------------------------------------------

QUEUE = 4


@pytest.fixture(scope="module")
def slow_images() -> list[bytes]:
    """Four 36-megapixel PNGs (120 KB each): seconds of decode + resize per request."""
    ramp = np.linspace(0, 255, 6000, dtype=np.float32)
    pixels = np.stack(
        [
            np.broadcast_to(ramp[None, :], (6000, 6000)),
            np.broadcast_to(ramp[:, None], (6000, 6000)),
            np.full((6000, 6000), 90.0),
        ],
        axis=-1,
    ).astype(np.uint8)
    data = encode(pixels, "PNG", compress_level=9)
    return [data] * QUEUE


@pytest.fixture(scope="module")
def tight_server(
    small_export: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    root = tmp_path_factory.mktemp("tight-models")
    ModelRepository(root).publish(small_export, "m")
    env = {
        "GRAFT_MAX_QUEUE": str(QUEUE),
        "GRAFT_MAX_IMAGES_PER_REQUEST": str(QUEUE),  # graft serve refuses more than the queue
        "GRAFT_REQUEST_TIMEOUT_S": "3",
        "GRAFT_SHUTDOWN_DRAIN_S": "1",
    }
    # The overload tests hold the queue with a paused inference worker, which only the
    # two-process layout has apart from the entry.
    with running_server(
        root, default_model="m", grpc=True, separate_inference=True, env=env
    ) as running:
        yield running


def post(server: RunningServer, images: list[bytes], timeout: float = 60) -> httpx.Response:
    files = [("images", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]
    return httpx.post(f"{server.http}/classify", files=files, timeout=timeout)


def small(colour: tuple[int, int, int] = (200, 10, 10)) -> bytes:
    return encode(Image.new("RGB", (32, 32), colour), "PNG")


def wait_until_idle(server: RunningServer, timeout_s: float = 120) -> None:
    """Until a request holding the whole queue is answered 200 (the slow work has drained).

    503 (slots still held, e.g. by an abandoned request before its deadline) and 504 (the model
    still busy) are expected for a while; a leaked slot would make it 503 for ever.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        response = post(server, [small()] * QUEUE)
        if response.status_code == 200:
            return
        assert response.status_code in (503, 504), response.text
        time.sleep(0.5)
    pytest.fail(f"no full-queue request was served in {timeout_s:.0f} s: a queue slot leaked")


def test_full_queue_is_503_with_retry_after_at_once_and_the_deadline_504(
    tight_server: RunningServer,
) -> None:
    # A frozen model worker holds an admitted request for exactly its deadline, whatever the
    # machine's speed: the queue stays full for that long, deterministically.
    with paused_inference(tight_server), ThreadPoolExecutor(1) as pool:
        holder = pool.submit(post, tight_server, [small()] * QUEUE)
        wait_for_images_in_flight(tight_server, QUEUE)
        started = time.monotonic()
        response = post(tight_server, [small()])
        latency = time.monotonic() - started
        with grpc.insecure_channel(tight_server.grpc_target or "") as channel:
            stub = pb_grpc.ImageClassifierStub(channel)
            with pytest.raises(grpc.RpcError) as refused:
                stub.Classify(pb.ClassifyRequest(images=[small()]), timeout=30)
        assert not holder.done(), "the holding request ended before the probes: raise its deadline"
        held = holder.result()
        assert held.status_code == 504, held.text
        assert held.json()["error"] == "deadline_exceeded"
        # The deadline frees the slots even though the model worker never answered.
        assert images_in_flight(tight_server) == 0, "the timed-out request kept its queue slots"
    assert response.status_code == 503, response.text
    assert response.json()["error"] == "overloaded"
    assert int(response.headers["retry-after"]) >= 1
    assert latency < 1.0, "a full queue must refuse at once, not wait for a slot"
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.value.details()
    wait_until_idle(tight_server)
    assert httpx.get(f"{tight_server.http}/readyz", timeout=10).status_code == 200


def test_a_request_larger_than_the_queue_is_400_not_an_endless_503(
    tight_server: RunningServer,
) -> None:
    response = post(tight_server, [small()] * (QUEUE + 1))
    assert response.status_code == 400, response.text
    message = response.json()["message"]
    assert "split" in message and "GRAFT_MAX_IMAGES_PER_REQUEST" in message, message
    with grpc.insecure_channel(tight_server.grpc_target or "") as channel:
        stub = pb_grpc.ImageClassifierStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.Classify(pb.ClassifyRequest(images=[small()] * (QUEUE + 1)), timeout=30)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "split" in (refused.value.details() or "")
    wait_until_idle(tight_server)  # while the largest allowed request is served


def test_clients_that_disconnect_mid_inference_leak_no_slot(
    tight_server: RunningServer, slow_images: list[bytes]
) -> None:
    for _ in range(2):
        with pytest.raises(httpx.TimeoutException):
            post(tight_server, slow_images, timeout=0.3)
        # The abandoned request keeps its slots until it ends (done or deadline), then frees them.
        wait_until_idle(tight_server)
    assert images_in_flight(tight_server) == 0
    assert httpx.get(f"{tight_server.http}/readyz", timeout=10).status_code == 200

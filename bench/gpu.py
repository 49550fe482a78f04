"""The `gpu` section's in-process parts: the network alone at batch sizes 1..256 on a device,
and graft's JPEG decode per CPU core. The section itself (bench/sections.py `gpu`) runs only
where an NVIDIA GPU is visible; these two also run on the CPU, which is how they are tested.

- sweep: the version's ONNX network on ONNX Runtime (its CUDA provider for a GPU device),
  opened by service.runtime.networks as serving opens it, fed random pixels (its cost does
  not depend on them): where the network stops getting cheaper per image is the batch size
  a GPU wants.
- decode: the SavedModel's `preprocess` signature (the decode + resize serving runs before
  the network) in worker processes of one TensorFlow thread each, started together behind a
  barrier. Images per CPU-second of a worker is the per-core figure; with every core busy,
  the total says how many images/s the CPU can feed the GPU.

Runs as its own process (`python -m bench.gpu SPEC.json OUT.json`, like bench/ceiling.py), so
the runtime's threads and GPU memory never share the orchestrator's process.
"""

import json
import multiprocessing
import os
import queue
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.images import load_images
from bench.servers import Unavailable
from bench.stats import percentiles_ms

LEVELS = (1, 16, 64, 256)  # closed-loop clients against graft on the GPU
SWEEP_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
DECODE_BATCH = 16  # images per preprocess call: serving decodes whole batches
WORKER_TIMEOUT_S = 300  # a decode worker that never reports (killed, hung) fails the run


def require_gpu(gpus: int | None = None) -> Any:
    """The first visible GPU, with ONNX Runtime's CUDA provider installed; else
    servers.Unavailable, whose one line says why and what measures a GPU without this."""
    from service.runtime.devices import GPU, resolve_device, visible_gpus
    from service.runtime.networks import ONNXRUNTIME, RuntimeUnavailable, resolve

    if (visible_gpus() if gpus is None else gpus) == 0:
        raise Unavailable(
            "no NVIDIA GPU visible (/dev/nvidia*, CUDA_VISIBLE_DEVICES): the gpu section runs "
            "only where one is; a GPU machine without TensorFlow runs bench/gpu_probe.py"
        )
    device = resolve_device(GPU, gpus)
    try:
        resolve(ONNXRUNTIME, device)
    except RuntimeUnavailable as exc:
        raise Unavailable(str(exc)) from None
    return device


def device_for(setting: str) -> Any:
    from service.runtime.devices import resolve_device

    return resolve_device(setting)


def network_sweep(
    onnx_path: Path,
    device_setting: str,
    batch_sizes: list[int],
    image_size: int,
    duration_s: float,
    warmup_calls: int = 2,
) -> list[dict[str, Any]]:
    """One row per batch size: calls, images/s and per-call latency of the network alone."""
    from service.runtime.networks import ONNXRUNTIME, default_threads, open_network, resolve

    device = device_for(device_setting)
    runtime = resolve(ONNXRUNTIME, device)  # RuntimeUnavailable: no CUDA provider here
    network = open_network(runtime, onnx_path, default_threads(1), device)
    rng = np.random.default_rng(0)
    rows = []
    for batch_size in batch_sizes:
        pixels = rng.uniform(0, 255, (batch_size, image_size, image_size, 3)).astype(np.float32)
        for _ in range(warmup_calls):
            network.run(pixels)
        latencies = _timed(lambda p=pixels: network.run(p), duration_s)
        rows.append(
            {
                "batch_size": batch_size,
                "device": str(device),
                "runtime": runtime,
                "calls": len(latencies),
                "throughput_ips": batch_size * len(latencies) / sum(latencies),
                "latency_ms": percentiles_ms(latencies),
            }
        )
    return rows


def _timed(call: Any, duration_s: float, min_calls: int = 3) -> list[float]:
    latencies: list[float] = []
    deadline = time.monotonic() + duration_s
    while time.monotonic() < deadline or len(latencies) < min_calls:
        start = time.monotonic()
        call()
        latencies.append(time.monotonic() - start)
    return latencies


def decode_per_core(
    model_dir: Path, images: list[bytes], workers: int, duration_s: float
) -> dict[str, Any]:
    """`workers` processes decoding `images` through the version's `preprocess` signature
    for `duration_s`, all started at once: images/s together and per CPU-second."""
    context = multiprocessing.get_context("spawn")  # TensorFlow does not survive a fork
    barrier, results = context.Barrier(workers), context.Queue()
    procs = [
        context.Process(
            target=_decode_worker,
            args=(str(model_dir), images, duration_s, barrier, results),
            daemon=True,
        )
        for _ in range(workers)
    ]
    for proc in procs:
        proc.start()
    try:
        reports = [_report(results, procs) for _ in procs]
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
    images_done = sum(r["images"] for r in reports)
    wall = max(r["wall_s"] for r in reports)
    cpu = sum(r["cpu_s"] for r in reports)
    return {
        "workers": workers,
        "cores": len(os.sched_getaffinity(0)),
        "images": images_done,
        "throughput_ips": images_done / wall,
        "images_per_cpu_s": images_done / cpu,
        "per_worker": reports,
    }


def _report(results: Any, procs: list[Any]) -> dict[str, Any]:
    deadline = time.monotonic() + WORKER_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            report = results.get(timeout=1)
        except queue.Empty:
            if any(p.exitcode not in (None, 0) for p in procs):
                codes = [p.exitcode for p in procs]
                raise RuntimeError(f"a decode worker died (exit codes {codes})") from None
            continue
        if "error" in report:
            raise RuntimeError(f"a decode worker failed: {report['error']}")
        return report
    raise RuntimeError(f"a decode worker did not report within {WORKER_TIMEOUT_S} s")


def _decode_worker(
    model_dir: str, images: list[bytes], duration_s: float, barrier: Any, results: Any
) -> None:
    try:
        decode = _preprocess(Path(model_dir))
        batches = [
            [images[(start + i) % len(images)] for i in range(DECODE_BATCH)]
            for start in range(0, len(images), DECODE_BATCH)
        ]
        decode(batches[0])  # trace and warm up before the clock starts
        barrier.wait(timeout=WORKER_TIMEOUT_S)
        results.put(_decode_loop(decode, batches, duration_s))
    except Exception as exc:  # reported, so the parent fails with the reason
        results.put({"error": f"{type(exc).__name__}: {exc}"})


def _preprocess(model_dir: Path) -> Any:
    import tensorflow as tf

    from service.store.layout import PREPROCESS_SIGNATURE

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    tf.config.set_visible_devices([], "GPU")  # decode runs on the CPU, as in serving
    signature = tf.saved_model.load(str(model_dir)).signatures[PREPROCESS_SIGNATURE]
    return lambda batch: signature(images=tf.constant(batch))["pixels"].numpy()


def _decode_loop(decode: Any, batches: list[list[bytes]], duration_s: float) -> dict[str, Any]:
    done = 0
    cpu_start, start = time.process_time(), time.monotonic()
    while time.monotonic() - start < duration_s or done == 0:
        done += len(decode(batches[(done // DECODE_BATCH) % len(batches)]))
    return {
        "images": done,
        "wall_s": time.monotonic() - start,
        "cpu_s": time.process_time() - cpu_start,
    }


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m bench.gpu SPEC.json OUT.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[0]).read_text())
    if spec["part"] == "sweep":
        out: Any = network_sweep(
            Path(spec["onnx"]),
            spec["device"],
            spec["batch_sizes"],
            spec["image_size"],
            spec["duration_s"],
        )
    else:
        images = load_images(Path(spec["images"]["dir"]), int(spec["images"]["count"]))
        out = [
            decode_per_core(Path(spec["model_dir"]), images, n, spec["duration_s"])
            for n in spec["workers"]
        ]
    Path(argv[1]).write_text(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

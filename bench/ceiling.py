"""The ceiling: the model called in-process on batches of the same encoded images, by one or
several threads at once, once per runtime. No HTTP, no queue, no serialisation: the best any
server on that runtime could do.

Each runtime runs the path serving runs (`serving_path`): `tensorflow` the SavedModel's
`serving_default` (decode + network in one call), an accelerated runtime the SavedModel's
`preprocess` signature (the same decode + resize) and then the version's ONNX network,
opened by service.runtime.networks with the threads per call graft would give it.

Several callers count because TensorFlow and the accelerated runtimes release the GIL during
a call: two threads each calling batch 4 outrun one thread on two cores, and a server that
runs batches concurrently can reach that too, so a one-thread ceiling would set the bar too
low.

Runs as its own process (`python -m bench.ceiling SPEC.json OUT.json`) so that the runtimes'
threads and memory never share a process with the orchestrator.
"""

import json
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from bench.images import load_images
from bench.meta import CpuWindow
from bench.stats import percentiles_ms

# Encoded images -> probabilities [n, C]
Infer = Callable[[list[bytes]], np.ndarray]


def serving_path(runtime: str, model_dir: Path, loaded: Any, threads: int) -> Infer:
    """What service.runtime.loaded_model.LoadedModel.predict runs for a version on `runtime`
    (`loaded`: the version's SavedModel, kept alive by the caller). Once LoadedModel.load
    takes a bare version folder, this becomes its `predict`."""
    import tensorflow as tf

    from service.runtime.networks import TENSORFLOW, open_network
    from service.store.layout import ONNX_FILE, PREPROCESS_SIGNATURE, SERVING_SIGNATURE

    if runtime == TENSORFLOW:
        serve = loaded.signatures[SERVING_SIGNATURE]
        return lambda images: serve(images=tf.constant(images))["probabilities"].numpy()
    if PREPROCESS_SIGNATURE not in loaded.signatures:
        raise RuntimeError(
            f"{model_dir} has no {PREPROCESS_SIGNATURE!r} signature: export it again"
        )
    preprocess = loaded.signatures[PREPROCESS_SIGNATURE]
    network = open_network(runtime, model_dir / ONNX_FILE, threads)

    def infer(images: list[bytes]) -> np.ndarray:
        pixels = preprocess(images=tf.constant(images))["pixels"].numpy()
        return network.run(pixels.astype(np.float32, copy=False))

    return infer


def measure(
    model_dir: Path,
    images: list[bytes],
    batch_sizes: list[int],
    callers: list[int],
    warmup_calls: int,
    duration_s: float,
    runtime: str = "tensorflow",
) -> list[dict[str, Any]]:
    """One row per (batch size, callers) on `runtime`, batch sizes outermost. Each number of
    callers gets the network with the threads per call graft gives that many batch threads
    (service.runtime.networks.default_threads)."""
    import tensorflow as tf

    from service.runtime.networks import TENSORFLOW, default_threads

    loaded = tf.saved_model.load(str(model_dir))
    rows = []
    for n in callers:
        # TensorFlow sizes its own thread pools, once per process: no per-call count to give
        threads = None if runtime == TENSORFLOW else default_threads(n)
        infer = serving_path(runtime, model_dir, loaded, threads or 1)
        for batch_size in batch_sizes:
            batches = [
                [images[(start + i) % len(images)] for i in range(batch_size)]
                for start in range(0, len(images), batch_size)
            ]
            for i in range(warmup_calls):
                infer(batches[i % len(batches)])
            row = _timed_calls(infer, batches, batch_size, n, duration_s)
            rows.append({"runtime": runtime, "threads": threads, **row})
    return sorted(rows, key=lambda r: (r["batch_size"], r["callers"]))


def _timed_calls(
    infer: Infer, batches: list[list[bytes]], batch_size: int, callers: int, duration_s: float
) -> dict[str, Any]:
    with CpuWindow() as window:
        deadline = time.monotonic() + duration_s
        with ThreadPoolExecutor(callers) as pool:
            # each caller starts at its own batch, so no two send the same tensor in lockstep
            per_caller = list(
                pool.map(lambda k: _call_loop(infer, batches, k, deadline), range(callers))
            )
    latencies = [t for caller in per_caller for t in caller]
    return {
        "batch_size": batch_size,
        "callers": callers,
        "calls": len(latencies),
        "throughput_ips": batch_size * len(latencies) / window.elapsed,
        "latency_ms": percentiles_ms(latencies),
        "cpu_cores": window.own_cpu_s / window.elapsed,
        **window.contention(),
    }


def _call_loop(infer: Infer, batches: list[list[bytes]], first: int, deadline: float) -> list:
    latencies: list[float] = []
    while time.monotonic() < deadline:
        t = time.monotonic()
        infer(batches[(first + len(latencies)) % len(batches)])
        latencies.append(time.monotonic() - t)
    return latencies


def _best(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One runtime's figures: its best row, and the single-caller batch-1 latency that T5
    compares a lone request with."""
    best = max(rows, key=lambda r: r["throughput_ips"])
    batch1 = next((r for r in rows if r["batch_size"] == 1 and r["callers"] == 1), None)
    return {
        "best_throughput_ips": best["throughput_ips"],
        "best_batch_size": best["batch_size"],
        "best_callers": best["callers"],
        "batch1_latency_ms": batch1["latency_ms"] if batch1 else None,
        "contended": any(r["contended"] for r in rows),
    }


def summarize(rows: list[dict[str, Any]], skipped: dict[str, str] | None = None) -> dict:
    """The section's result: every row, each runtime's best (`runtimes`), and at the top level
    the fastest runtime's, which the open-loop rates and the throughput table use. Rows from
    before runtimes were measured are TensorFlow's."""
    by_runtime: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_runtime.setdefault(row.get("runtime", "tensorflow"), []).append(row)
    runtimes = {name: _best(group) for name, group in by_runtime.items()}
    fastest = max(runtimes, key=lambda name: runtimes[name]["best_throughput_ips"])
    return {
        "rows": rows,
        "runtimes": runtimes,
        "fastest_runtime": fastest,
        **runtimes[fastest],
        "contended": any(r["contended"] for r in rows),
        "skipped_runtimes": skipped or {},
    }


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m bench.ceiling SPEC.json OUT.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[0]).read_text())
    images = load_images(Path(spec["images"]["dir"]), int(spec["images"]["count"]))
    rows = []
    for runtime in spec.get("runtimes", ["tensorflow"]):
        rows += measure(
            Path(spec["model_dir"]),
            images,
            spec["batch_sizes"],
            spec["callers"],
            spec["warmup_calls"],
            spec["duration_s"],
            runtime,
        )
    Path(argv[1]).write_text(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

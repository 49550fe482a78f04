"""The ceiling: the SavedModel's `serving_default` called in-process on batches of the same
encoded images, by one or several threads at once. No HTTP, no queue, no serialisation: the
best any server could do.

Several callers count because TensorFlow releases the GIL during a call: two threads each
calling batch 4 outrun one thread on two cores, and a server that runs batches concurrently
can reach that too, so a one-thread ceiling would set the bar too low.

Runs as its own process (`python -m bench.ceiling SPEC.json OUT.json`) so that TensorFlow's
threads and memory never share a process with the orchestrator.
"""

import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.images import load_images
from bench.meta import CONTENTION_THRESHOLD, busy_cpu_seconds
from bench.stats import percentiles_ms


def measure(
    model_dir: Path,
    images: list[bytes],
    batch_sizes: list[int],
    callers: list[int],
    warmup_calls: int,
    duration_s: float,
) -> list[dict[str, Any]]:
    """One row per (batch size, callers), batch sizes outermost."""
    import tensorflow as tf

    loaded = tf.saved_model.load(str(model_dir))
    fn = loaded.signatures["serving_default"]
    rows = []
    for batch_size in batch_sizes:
        batches = [
            tf.constant([images[(start + i) % len(images)] for i in range(batch_size)])
            for start in range(0, len(images), batch_size)
        ]
        for i in range(warmup_calls):
            fn(images=batches[i % len(batches)])["probabilities"].numpy()
        rows += [_timed_calls(fn, batches, batch_size, n, duration_s) for n in callers]
    return rows


def _timed_calls(
    fn: Any, batches: list[Any], batch_size: int, callers: int, duration_s: float
) -> dict[str, Any]:
    cpu, busy = time.process_time(), busy_cpu_seconds()
    begin = time.monotonic()
    deadline = begin + duration_s
    with ThreadPoolExecutor(callers) as pool:
        # each caller starts at its own batch, so no two send the same tensor in lockstep
        per_caller = list(pool.map(lambda k: _call_loop(fn, batches, k, deadline), range(callers)))
    elapsed = time.monotonic() - begin
    latencies = [t for caller in per_caller for t in caller]
    own, busy = time.process_time() - cpu, busy_cpu_seconds() - busy
    # CPU that other processes took meanwhile, as a share of the machine: contention flag
    foreign = max(busy - own, 0.0) / (elapsed * (os.cpu_count() or 1))
    return {
        "batch_size": batch_size,
        "callers": callers,
        "calls": len(latencies),
        "throughput_ips": batch_size * len(latencies) / elapsed,
        "latency_ms": percentiles_ms(latencies),
        "cpu_cores": own / elapsed,
        "foreign_cpu_share": foreign,
        "contended": foreign > CONTENTION_THRESHOLD,
    }


def _call_loop(fn: Any, batches: list[Any], first: int, deadline: float) -> list[float]:
    latencies: list[float] = []
    while time.monotonic() < deadline:
        t = time.monotonic()
        fn(images=batches[(first + len(latencies)) % len(batches)])["probabilities"].numpy()
        latencies.append(time.monotonic() - t)
    return latencies


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The section's result: every row, the best of them, and the single-caller batch-1
    latency that T5 compares a lone request with."""
    best = max(rows, key=lambda r: r["throughput_ips"])
    batch1 = next((r for r in rows if r["batch_size"] == 1 and r["callers"] == 1), None)
    return {
        "rows": rows,
        "best_throughput_ips": best["throughput_ips"],
        "best_batch_size": best["batch_size"],
        "best_callers": best["callers"],
        "batch1_latency_ms": batch1["latency_ms"] if batch1 else None,
        "contended": any(r["contended"] for r in rows),
    }


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m bench.ceiling SPEC.json OUT.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[0]).read_text())
    images = load_images(Path(spec["images"]["dir"]), int(spec["images"]["count"]))
    rows = measure(
        Path(spec["model_dir"]),
        images,
        spec["batch_sizes"],
        spec["callers"],
        spec["warmup_calls"],
        spec["duration_s"],
    )
    Path(argv[1]).write_text(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

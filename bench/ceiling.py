"""The ceiling: the SavedModel's `serving_default` called in-process on batches of the same
encoded images. No HTTP, no queue, no serialisation: the best any server could do.

Runs as its own process (`python -m bench.ceiling SPEC.json OUT.json`) so that TensorFlow's
threads and memory never share a process with the orchestrator.
"""

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from bench.images import load_images
from bench.meta import CONTENTION_THRESHOLD, busy_cpu_seconds
from bench.stats import percentiles_ms


def measure(
    model_dir: Path,
    images: list[bytes],
    batch_sizes: list[int],
    warmup_calls: int,
    duration_s: float,
) -> list[dict[str, Any]]:
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
        rows.append(_timed_calls(fn, batches, batch_size, duration_s))
    return rows


def _timed_calls(fn: Any, batches: list[Any], batch_size: int, duration_s: float) -> dict:
    latencies: list[float] = []
    cpu, busy = time.process_time(), busy_cpu_seconds()
    begin = time.monotonic()
    while time.monotonic() - begin < duration_s:
        t = time.monotonic()
        fn(images=batches[len(latencies) % len(batches)])["probabilities"].numpy()
        latencies.append(time.monotonic() - t)
    elapsed = time.monotonic() - begin
    own, busy = time.process_time() - cpu, busy_cpu_seconds() - busy
    # CPU that other processes took meanwhile, as a share of the machine: contention flag
    foreign = max(busy - own, 0.0) / (elapsed * (os.cpu_count() or 1))
    return {
        "batch_size": batch_size,
        "calls": len(latencies),
        "throughput_ips": batch_size * len(latencies) / elapsed,
        "latency_ms": percentiles_ms(latencies),
        "cpu_cores": own / elapsed,
        "foreign_cpu_share": foreign,
        "contended": foreign > CONTENTION_THRESHOLD,
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
        spec["warmup_calls"],
        spec["duration_s"],
    )
    Path(argv[1]).write_text(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Decode throughput of serving's decode pool: a batch of real JPEGs through a version's
`preprocess` signature, serially (one call per batch, GRAFT_DECODE_THREADS=1) and split over
pools of N threads, each pool size in a fresh process (TensorFlow reads its thread settings
once), the sizes interleaved round by round so that a neighbour's load hits them alike.

    python -m bench.decode_pool --model-root models --model imagenet --threads 1,2 --rounds 3

Each worker sets TensorFlow's threads as serving does for that pool size, loads the version
(service.runtime.loaded_model) and decodes the batch through a `DecodePool` of that size calling
the version's `decode` (its `preprocess` signature, what `predict` hands the network) for
`--duration-s`. The version needs the `preprocess` signature (exports since the ONNX runtime);
no ONNX file is needed, the network does not run. Prints one JSON document: per round and pool
size, images/s, CPU milliseconds per image and the per-batch latency.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.images import data_dir, load_images, shown
from bench.stats import percentiles_ms


def skimage_jpegs(count: int) -> list[bytes]:
    """Real photos when the benchmark's data set is absent (scikit-image's samples)."""
    from bench.soak import good_images

    return good_images(count)


def batch_of(count: int) -> tuple[list[bytes], str]:
    try:
        return load_images(data_dir(), count), shown(data_dir())
    except FileNotFoundError:
        return skimage_jpegs(count), "skimage.data (256x256 JPEGs)"


def measure(
    model_root: Path, model: str, version: int, threads: int, batch: int, seconds: float
) -> dict[str, Any]:
    """In this process: `batch` images decoded by a pool of `threads`, for `seconds`."""
    from service.runtime.decode_pool import DecodePool, configure_tensorflow
    from service.runtime.loaded_model import LoadedModel
    from service.store.repository import ModelRepository

    configured = configure_tensorflow(threads)  # before the load: TensorFlow's first op
    loaded = LoadedModel.load(ModelRepository(model_root), model, version)
    pool = DecodePool(threads)
    images, source = batch_of(batch)
    pool.decode(loaded.decode, images)  # warm: traced, allocated
    latencies: list[float] = []
    cpu_start, start = time.process_time(), time.monotonic()
    while time.monotonic() - start < seconds or len(latencies) < 3:
        began = time.monotonic()
        pool.decode(loaded.decode, images)
        latencies.append(time.monotonic() - began)
    wall, cpu = time.monotonic() - start, time.process_time() - cpu_start
    done = batch * len(latencies)
    return {
        "threads": threads,
        "tensorflow_threads_set": configured,
        "images": done,
        "images_per_s": round(done / wall, 1),
        "cpu_ms_per_image": round(1000 * cpu / done, 2),
        "batch_latency_ms": percentiles_ms(latencies),
        "source": source,
    }


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.decode_pool", description=__doc__)
    parser.add_argument("--model-root", type=Path, default=Path("models"))
    parser.add_argument("--model", default="imagenet")
    parser.add_argument("--version", type=int, default=1)
    parser.add_argument("--threads", default="1,2", help="pool sizes, comma-separated")
    parser.add_argument("--batch", type=int, default=16, help="images per decode call")
    parser.add_argument("--duration-s", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    common = (args.model_root, args.model, args.version)
    if args.worker is not None:
        print(json.dumps(measure(*common, args.worker, args.batch, args.duration_s)))
        return 0
    rows = []
    for round_ in range(args.rounds):
        for threads in [int(t) for t in args.threads.split(",")]:
            command = [sys.executable, "-m", "bench.decode_pool", *argv, "--worker", str(threads)]
            env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
            out = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
            rows.append({"round": round_, **json.loads(out.stdout.strip().splitlines()[-1])})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(json.dumps({"cores": len(os.sched_getaffinity(0)), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

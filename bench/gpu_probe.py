"""GPU figures on a machine with a GPU but no TensorFlow and no network: prints one JSON document.

Measures, in a few minutes, what sets graft's GPU batching and decode-pool defaults:
- the EfficientNet-Lite0 network (graft's own Keras 3 code, training/backbones/
  lite0_architecture.py, with its ImageNet weights) at batch sizes 1..256 through Keras 3 on
  the JAX backend: from host float32 pixels, as serving feeds it ("host"), and with the batch
  already on the device ("resident", the network alone), in float32 and mixed_float16;
- JPEG decode + resize to the network's input with PIL, in 1 and in all-core process pools
  (real JPEGs from --images, else generated ones), images/s and per CPU-second;
- from the two, the smallest batch within 10 % of the best throughput and the cores it takes
  to decode that fast.

It needs Python with numpy, Pillow, jax (with its CUDA plugin) and keras (+ h5py, its
dependency), and this repository's training/backbones/lite0_architecture.py; it imports no
TensorFlow and nothing else of graft. The weights come from a machine with graft installed:

    python -c "from training.backbones import efficientnet_lite0; \\
        efficientnet_lite0(weights='imagenet').save_weights('lite0.weights.h5')"

then, on the GPU machine:

    python bench/gpu_probe.py --weights lite0.weights.h5 > gpu-probe.json

It refuses to run when JAX sees no GPU (a JAX without its CUDA plugin falls back to the CPU
silently) unless --allow-cpu. --backend tensorflow exists only so that the tests can run it
on a machine without JAX; the GPU figures come from --backend jax.
"""

import argparse
import hashlib
import importlib.util
import io
import json
import multiprocessing
import os
import platform
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

ARCHITECTURE = Path(__file__).resolve().parents[1] / "training/backbones/lite0_architecture.py"
BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
KNEE = 0.9  # the smallest batch size reaching this share of the best throughput
GRAFT_PACKAGES = ("service", "training", "bench", "graft_cli")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python bench/gpu_probe.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--weights", type=Path, required=True, help="a Lite0 .weights.h5 file")
    parser.add_argument("--images", type=Path, help="folder of JPEGs (recursive); else generated")
    parser.add_argument("--batch-sizes", type=_ints, default=list(BATCH_SIZES))
    parser.add_argument("--precisions", type=_names, default=["float32", "mixed_float16"])
    parser.add_argument("--image-size", type=int, default=224, help="the network's input side")
    parser.add_argument("--duration", type=float, default=1.0, help="seconds per batch size")
    parser.add_argument(
        "--decode-workers",
        type=_ints,
        default=sorted({1, len(os.sched_getaffinity(0))}),
        help="process-pool sizes to decode with (default: 1 and every core)",
    )
    parser.add_argument("--decode-duration", type=float, default=3.0)
    parser.add_argument("--generated-images", type=int, default=64)
    parser.add_argument("--backend", choices=("jax", "tensorflow"), default="jax")
    parser.add_argument("--allow-cpu", action="store_true", help="measure even without a GPU")
    return parser.parse_args(argv)


def _ints(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: positive integers, comma-separated")
    return values


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


# -- JPEG decode (PIL, process pool) -------------------------------------------------------------


def generated_jpegs(count: int, side: int = 256) -> list[bytes]:
    """Photo-like JPEGs (smooth colour fields plus grain, quality 90), as the plantvillage
    leaves graft is benchmarked on: noise alone would compress worse and decode slower."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:side, 0:side] / side
    images = []
    for _ in range(count):
        a, b, c = rng.uniform(0.5, 3.0, 3)
        field = np.stack([np.sin(a * x * 6), np.cos(b * y * 6), np.sin(c * (x + y) * 4)], -1)
        pixels = (field * 90 + 128 + rng.normal(0, 12, (side, side, 3))).clip(0, 255)
        buffer = io.BytesIO()
        Image.fromarray(pixels.astype(np.uint8)).save(buffer, "JPEG", quality=90)
        images.append(buffer.getvalue())
    return images


def read_jpegs(folder: Path) -> list[bytes]:
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in {".jpg", ".jpeg"})
    if not paths:
        raise SystemExit(f"no .jpg files under {folder}")
    return [p.read_bytes() for p in paths]


_IMAGES: list[bytes] = []


def _init_decoder(images: list[bytes], side: int, barrier: Any) -> None:
    global _IMAGES
    _IMAGES = images
    decode(images[0], side)  # imports numpy and PIL before the clock starts
    barrier.wait()  # every worker decodes from the same moment on


def decode(data: bytes, side: int) -> Any:
    """What serving does before the network: decode, RGB, resize, float32 pixels."""
    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        rgb = image.convert("RGB").resize((side, side), Image.Resampling.BILINEAR)
    return np.asarray(rgb, dtype=np.float32)


def _decode_for(duration_s: float, side: int, first: int) -> tuple[int, float, float]:
    done, cpu, start = 0, time.process_time(), time.monotonic()
    while time.monotonic() - start < duration_s or done == 0:
        decode(_IMAGES[(first + done) % len(_IMAGES)], side)
        done += 1
    return done, time.monotonic() - start, time.process_time() - cpu


def decode_throughput(
    images: list[bytes], workers: int, duration_s: float, side: int
) -> dict[str, Any]:
    # spawn: the workers import neither JAX nor Keras, and forking a threaded JAX is unsafe
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(workers)
    with context.Pool(workers, _init_decoder, (images, side, barrier)) as pool:
        jobs = [(duration_s, side, k * len(images) // workers) for k in range(workers)]
        reports = pool.starmap(_decode_for, jobs, chunksize=1)
    done = sum(r[0] for r in reports)
    return {
        "workers": workers,
        "images": done,
        "throughput_ips": done / max(r[1] for r in reports),
        "images_per_cpu_s": done / sum(r[2] for r in reports),
    }


# -- the network (Keras 3) ---------------------------------------------------------------------


def load_architecture() -> ModuleType:
    """graft's Lite0 module by its path, under a private name: importing it as
    training.backbones.* would run graft's package __init__ files (and their imports)."""
    spec = importlib.util.spec_from_file_location("graft_lite0_architecture", ARCHITECTURE)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load {ARCHITECTURE}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def devices(backend: str) -> dict[str, Any]:
    if backend == "jax":
        import jax

        found = jax.devices()
        return {
            "platform": jax.default_backend(),
            "jax": jax.__version__,
            "devices": [f"{d.platform}:{d.id} {d.device_kind}" for d in found],
        }
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    return {"platform": "gpu" if gpus else "cpu", "devices": [d.name for d in gpus] or ["cpu"]}


def build(weights: Path, side: int, precision: str) -> Any:
    import keras

    keras.mixed_precision.set_global_policy(precision)
    model = load_architecture().build_efficientnet_lite0((side, side, 3))
    model.load_weights(weights)
    return model


def _calls(model: Any, backend: str) -> Any:
    """pixels -> {mode: a call that runs the network once and waits for it}. On JAX both modes
    share one jitted function per shape (one compile each): "host" sends the float32 batch
    and brings the probabilities back, as serving does; "resident" runs on a batch already
    on the device, the network alone. Elsewhere (the tests) only "host", predict_on_batch."""
    if backend != "jax":
        return lambda pixels: {"host": lambda: model.predict_on_batch(pixels)}
    import jax
    import jax.numpy as jnp
    import numpy as np

    # Copies: Keras replaces its own arrays after a call, leaving captured references deleted.
    trainable = [jnp.array(v.value, copy=True) for v in model.trainable_variables]
    frozen = [jnp.array(v.value, copy=True) for v in model.non_trainable_variables]
    forward = jax.jit(lambda t, f, x: model.stateless_call(t, f, x, training=False)[0])

    def calls(pixels: Any) -> dict[str, Any]:
        on_device = jax.device_put(pixels)
        return {
            "host": lambda: np.asarray(forward(trainable, frozen, jax.device_put(pixels))),
            "resident": lambda: forward(trainable, frozen, on_device).block_until_ready(),
        }

    return calls


def _timed(call: Any, duration_s: float, min_calls: int = 3) -> list[float]:
    latencies: list[float] = []
    deadline = time.monotonic() + duration_s
    while time.monotonic() < deadline or len(latencies) < min_calls:
        start = time.monotonic()
        call()
        latencies.append(time.monotonic() - start)
    return latencies


def _row(mode: str, precision: str, batch: int, latencies: list[float]) -> dict[str, Any]:
    import numpy as np

    ms = np.asarray(latencies) * 1000.0
    return {
        "mode": mode,
        "precision": precision,
        "batch_size": batch,
        "calls": len(latencies),
        "throughput_ips": batch * len(latencies) / (ms.sum() / 1000.0),
        "latency_ms": {
            "p50": float(np.percentile(ms, 50)),
            "p99": float(np.percentile(ms, 99)),
            "mean": float(ms.mean()),
        },
    }


def network_curve(args: argparse.Namespace, precision: str) -> list[dict[str, Any]]:
    import numpy as np

    calls_for = _calls(build(args.weights, args.image_size, precision), args.backend)
    rng = np.random.default_rng(0)
    rows = []
    for batch in args.batch_sizes:
        shape = (batch, args.image_size, args.image_size, 3)
        pixels = rng.uniform(0, 255, shape).astype(np.float32)
        for mode, call in calls_for(pixels).items():
            call(), call()  # compile this shape, then one warm call
            rows.append(_row(mode, precision, batch, _timed(call, args.duration)))
    return rows


# -- the figures that set the defaults ---------------------------------------------------------


def derived(network: list[dict[str, Any]], decode: list[dict[str, Any]]) -> dict[str, Any]:
    """Per precision (host mode): the best throughput, the knee batch size, and the cores
    that decoding at the knee's rate takes."""
    per_core = min((r["images_per_cpu_s"] for r in decode), default=None)
    figures: dict[str, Any] = {}
    for precision in sorted({r["precision"] for r in network}):
        rows = [r for r in network if r["precision"] == precision and r["mode"] == "host"]
        best = max(rows, key=lambda r: r["throughput_ips"])
        knee = min(
            (r for r in rows if r["throughput_ips"] >= KNEE * best["throughput_ips"]),
            key=lambda r: r["batch_size"],
        )
        figures[precision] = {
            "best_throughput_ips": best["throughput_ips"],
            "best_batch_size": best["batch_size"],
            "knee_batch_size": knee["batch_size"],
            "knee_throughput_ips": knee["throughput_ips"],
            "cores_to_feed_knee": knee["throughput_ips"] / per_core if per_core else None,
        }
    return figures


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    # Before Keras is imported anywhere: graft's own modules would default it to TensorFlow.
    os.environ["KERAS_BACKEND"] = args.backend
    if not args.weights.is_file():
        print(f"weights file {args.weights} not found (see --help)", file=sys.stderr)
        return 2
    started = time.monotonic()
    where = devices(args.backend)  # first: a JAX without its CUDA plugin stops the run here
    if where["platform"] != "gpu" and not args.allow_cpu:
        print(
            f"{args.backend} sees no GPU ({', '.join(where['devices'])}); install its CUDA "
            "build (jax[cuda12]) or pass --allow-cpu to measure the CPU",
            file=sys.stderr,
        )
        return 2
    images = read_jpegs(args.images) if args.images else generated_jpegs(args.generated_images)
    decode_rows = [
        decode_throughput(images, n, args.decode_duration, args.image_size)
        for n in args.decode_workers
    ]
    network = [row for p in args.precisions for row in network_curve(args, p)]
    import keras

    report = {
        "probe": "bench/gpu_probe.py",
        "machine": {
            "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(),
            "cores": len(os.sched_getaffinity(0)),
        },
        "backend": args.backend,
        "keras": keras.__version__,
        **where,
        "tensorflow_imported": "tensorflow" in sys.modules,
        "graft_modules": sorted(m for m in sys.modules if m.split(".")[0] in GRAFT_PACKAGES),
        "weights": {"file": args.weights.name, "sha256": _sha256(args.weights)},
        "network": {"model": "efficientnet_lite0", "image_size": args.image_size, "rows": network},
        "decode": {
            "images": str(args.images) if args.images else f"{len(images)} generated",
            "decoder": "PIL decode + RGB + bilinear resize",
            "rows": decode_rows,
        },
        "derived": derived(network, decode_rows),
        "elapsed_s": time.monotonic() - started,
    }
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

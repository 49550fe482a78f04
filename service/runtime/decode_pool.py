"""GRAFT_DECODE_THREADS: the images of a batch decoded in parallel, by a pool of threads.

On a GPU the network is cheap at large batches and the CPU's JPEG decoding becomes the limit,
so a version on an accelerated runtime hands its batch's images to one pool per process, in
as many chunks as the pool has threads, each chunk one call of the version's own `preprocess`
signature (the one decode + resize training uses: never a second implementation). Threads,
not processes: TensorFlow releases the GIL while it decodes, the signature lives in this
process, and a process per core would hold a copy of TensorFlow and the model each.

`auto` is the device's default (service.runtime.devices.decode_threads_default: every core on
a GPU, capped by a container's CPU limit; 1 on the CPU, where the network competes for the same
cores); 1 is the serial path, one `preprocess` call for the whole batch, as before the pool.

With a pool, each TensorFlow kernel runs on one thread (intra-op 1) and at most the pool's
size of them at once (inter-op): the parallelism is the pool's, so pool threads x TensorFlow
threads never exceed the cores. TensorFlow reads these once, before its first op, so
`configure_tensorflow` runs before a model loads; in a process where TensorFlow already
started (a test, a second set of settings) the threads stay as they are and the log says so.
"""

import logging
import re
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import pairwise
from threading import Lock

import numpy as np

from service.runtime.devices import Device, decode_threads_default

logger = logging.getLogger("graft.runtime")

AUTO = "auto"
MAX_THREADS = 1024
_SETTING = re.compile(r"^(auto|\d{1,4})$")

Decode = Callable[[list[bytes]], np.ndarray]  # encoded images -> float32 pixels [n, s, s, 3]


class DecodeSettingError(ValueError):
    """GRAFT_DECODE_THREADS is not `auto` or a thread count."""


def resolve_decode_threads(setting: str, device: Device) -> int:
    """The pool size `GRAFT_DECODE_THREADS=setting` means on `device`; DecodeSettingError
    (one line, naming the setting) otherwise."""
    text = setting.strip().lower()
    match = _SETTING.match(text)
    if match is None or (text != AUTO and not 1 <= int(text) <= MAX_THREADS):
        raise DecodeSettingError(
            f"GRAFT_DECODE_THREADS={setting[:40]!r} is not a thread count; use auto (every "
            f"core on a GPU, 1 on the CPU) or a number from 1 to {MAX_THREADS}"
        )
    return decode_threads_default(device) if text == AUTO else int(text)


class DecodePool:
    """Runs a `Decode` over a batch's images in up to `threads` chunks at once."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self._executor = (
            ThreadPoolExecutor(threads, thread_name_prefix="graft-decode") if threads > 1 else None
        )

    def decode(self, decode: Decode, images: list[bytes]) -> np.ndarray:
        """`decode(images)`, the batch split into contiguous chunks decoded in parallel and
        joined in order. Raises what the first failing chunk raised (after every chunk has
        finished), as one call over the whole batch would: the batch runner then splits the
        batch to find the bad image."""
        chunks = _chunks(images, self.threads)
        if self._executor is None or len(chunks) < 2:
            return decode(images)
        futures = [self._executor.submit(decode, chunk) for chunk in chunks]
        return np.concatenate(_results(futures), axis=0)


def _chunks(images: list[bytes], parts: int) -> list[list[bytes]]:
    """`images` in at most `parts` contiguous chunks whose sizes differ by at most one."""
    parts = max(1, min(parts, len(images)))
    size, extra = divmod(len(images), parts)
    bounds = [index * size + min(index, extra) for index in range(parts + 1)]
    return [images[start:end] for start, end in pairwise(bounds)]


def _results(futures: list[Future[np.ndarray]]) -> list[np.ndarray]:
    errors = [future.exception() for future in futures]  # waits for every chunk
    first = next((error for error in errors if error is not None), None)
    if first is not None:
        raise first
    return [future.result() for future in futures]


SERIAL = DecodePool(1)  # one `preprocess` call per batch: no pool, no threads
_pools: dict[int, DecodePool] = {1: SERIAL}
_pools_lock = Lock()


def shared_pool(threads: int) -> DecodePool:
    """The process's pool of `threads` threads: every version and every concurrent batch
    shares it, so decoding never takes more threads than the setting, however many batches
    run at once."""
    with _pools_lock:
        if threads not in _pools:
            _pools[threads] = DecodePool(threads)
        return _pools[threads]


_configured: dict[int, bool] = {}


def configure_tensorflow(threads: int) -> bool:
    """With a pool: TensorFlow kernels single-threaded, at most `threads` at once. False when
    TensorFlow had already started with other values (they stay; logged once)."""
    if threads <= 1:
        return True  # the serial path keeps TensorFlow's own defaults, as before the pool
    with _pools_lock:
        if threads not in _configured:
            _configured[threads] = _set_tensorflow_threads(threads)
        return _configured[threads]


def _set_tensorflow_threads(threads: int) -> bool:
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError:
        logger.warning(
            "TensorFlow had already started, so its threads stay as they are (intra-op %s, "
            "inter-op %s) beside %d decode threads",
            tf.config.threading.get_intra_op_parallelism_threads() or "all cores",
            tf.config.threading.get_inter_op_parallelism_threads() or "all cores",
            threads,
        )
        return False
    return True

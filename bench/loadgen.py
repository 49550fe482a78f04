"""Async load generator: closed loop (N clients, each sends its next image as soon as the last
one returns) and open loop (Poisson arrivals at a fixed rate, latency counted from the
scheduled start so a slow server cannot hide its queueing: no coordinated omission).

Runs as its own process (`python -m bench.loadgen SPEC.json OUT.json`) so the load it
generates and the CPU it burns are separate from the orchestrator's; it reports its own CPU
time per request so a reader can check it was not the bottleneck.

Timestamps are time.monotonic(), which on Linux is one clock for every process on the machine:
the orchestrator uses it to line samples up with the moment it published a model version.
"""

import asyncio
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from bench.images import load_images
from bench.meta import CpuWindow
from bench.stats import Sample, summarize
from bench.targets import RequestFailed, Target, make_target

MAX_IN_FLIGHT = 1024  # open loop: beyond this the server is hopelessly behind; count drops


async def _timed(target: Target, payload: Any, start: float) -> Sample:
    try:
        version = await target.send(payload)
    except RequestFailed as exc:
        return Sample(start, time.monotonic() - start, exc.kind)
    except Exception as exc:  # a malformed answer is a failed request, never a crashed run
        return Sample(start, time.monotonic() - start, type(exc).__name__)
    return Sample(start, time.monotonic() - start, None, version)


def cpu_figures(window: CpuWindow) -> dict[str, Any]:
    """This process's CPU and the whole machine's over the measured window, and the instants
    they cover, so the orchestrator counts the server's CPU over the very same span."""
    return {
        "loadgen_cpu_s": window.own_cpu_s,
        "machine_busy_cpu_s": window.busy,
        "cpu_window": [window.start_at, window.end_at],
    }


async def _metered(window: tuple[float, float]) -> CpuWindow:
    """CPU counted from the window's start to its end, not to the last answer: the requests
    still in flight when it closes are served after it, and that work belongs to no figure."""
    await asyncio.sleep(max(window[0] - time.monotonic(), 0.0))
    meter = CpuWindow().start()
    await asyncio.sleep(max(window[1] - time.monotonic(), 0.0))
    return meter.stop()


async def closed_loop(
    target: Target, payloads: list[Any], concurrency: int, warmup_s: float, duration_s: float
) -> tuple[list[Sample], tuple[float, float], dict[str, Any]]:
    """Returns (samples, measured window, CPU used in it)."""
    begin = time.monotonic()
    window = (begin + warmup_s, begin + warmup_s + duration_s)
    samples: list[Sample] = []

    async def client(index: int) -> None:
        while (now := time.monotonic()) < window[1]:
            samples.append(await _timed(target, payloads[index % len(payloads)], now))
            index += concurrency

    meter, *_ = await asyncio.gather(_metered(window), *(client(i) for i in range(concurrency)))
    return samples, window, cpu_figures(meter)


def poisson_offsets(rate: float, total_s: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    offsets = np.cumsum(rng.exponential(1.0 / rate, size=int(rate * total_s * 1.5) + 16))
    return offsets[offsets < total_s]


def _record(
    task: asyncio.Task[Sample], in_flight: dict[asyncio.Task[Sample], float], samples: list[Sample]
) -> None:
    if not task.cancelled():  # a cancelled one was already counted by _drain
        in_flight.pop(task, None)
        samples.append(task.result())


async def open_loop(
    target: Target,
    payloads: list[Any],
    rate: float,
    warmup_s: float,
    duration_s: float,
    seed: int = 0,
) -> tuple[list[Sample], tuple[float, float], dict[str, Any]]:
    """Returns (samples, measured window, CPU used in it + the worst dispatch lag)."""
    begin = time.monotonic()
    window = (begin + warmup_s, begin + warmup_s + duration_s)
    samples: list[Sample] = []
    in_flight: dict[asyncio.Task[Sample], float] = {}  # task -> scheduled start
    worst_lag = 0.0
    meter = asyncio.create_task(_metered(window))
    for i, offset in enumerate(poisson_offsets(rate, warmup_s + duration_s, seed)):
        scheduled = begin + float(offset)
        if (delay := scheduled - time.monotonic()) > 0:
            await asyncio.sleep(delay)
        # A load generator that cannot dispatch on time would understate latency; report it.
        worst_lag = max(worst_lag, time.monotonic() - scheduled)
        if len(in_flight) >= MAX_IN_FLIGHT:
            samples.append(Sample(scheduled, 0.0, "dropped_in_flight_cap"))
            continue
        task = asyncio.create_task(_timed(target, payloads[i % len(payloads)], scheduled))
        in_flight[task] = scheduled
        task.add_done_callback(lambda t: _record(t, in_flight, samples))
    # The window closes after the last arrival; answers still coming are awaited outside it.
    cpu = cpu_figures(await meter)
    await _drain(in_flight, samples, grace_s=max(10.0, duration_s))
    return samples, window, {**cpu, "worst_dispatch_lag_ms": 1000.0 * worst_lag}


async def _drain(
    in_flight: dict[asyncio.Task[Sample], float], samples: list[Sample], grace_s: float
) -> None:
    """Wait for requests still in flight, but not forever: past the grace period a server that
    is hopelessly behind gets its unanswered requests counted as errors, not awaited."""
    if not in_flight:
        return
    _, pending = await asyncio.wait(set(in_flight), timeout=grace_s)
    now = time.monotonic()
    for task in pending:
        task.cancel()
        samples.append(Sample(in_flight[task], now - in_flight[task], "unanswered_at_end"))
    await asyncio.gather(*pending, return_exceptions=True)


def _result(
    run: dict[str, Any],
    samples: list[Sample],
    window: tuple[float, float],
    cpu: dict[str, Any],
    keep_samples: bool,
) -> dict[str, Any]:
    summary = summarize(samples, *window)
    span = cpu["cpu_window"][1] - cpu["cpu_window"][0]
    result = {
        **run,
        **asdict(summary),
        **cpu,
        "window": list(window),
        # fraction of ONE core used by the load generator, and its cost per request
        "loadgen_cpu_share": cpu["loadgen_cpu_s"] / span,
        "loadgen_cpu_ms_per_request": 1000.0 * cpu["loadgen_cpu_s"] / max(summary.requests, 1),
    }
    if keep_samples:
        result["samples"] = [[s.start, s.latency_s, s.error, s.version] for s in samples]
    return result


async def run_spec(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """spec: {"target": {...}, "images": {"dir", "count"}, "runs": [{"mode": "closed",
    "concurrency", "warmup_s", "duration_s"} | {"mode": "open", "rate", ...}],
    "keep_samples": bool, "started_file": optional path that gets the monotonic start time}."""
    images = load_images(Path(spec["images"]["dir"]), int(spec["images"]["count"]))
    results = []
    for run in spec["runs"]:
        closed = run["mode"] == "closed"
        target = make_target(spec["target"], run["concurrency"] if closed else MAX_IN_FLIGHT)
        payloads = [target.prepare(image) for image in images]
        if started := spec.get("started_file"):  # lets a caller time events within the run
            Path(started).write_text(str(time.monotonic()))
        if closed:
            measured = await closed_loop(
                target, payloads, run["concurrency"], run["warmup_s"], run["duration_s"]
            )
        else:
            measured = await open_loop(
                target, payloads, run["rate"], run["warmup_s"], run["duration_s"]
            )
        await target.close()
        results.append(_result(run, *measured, bool(spec.get("keep_samples"))))
    return results


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m bench.loadgen SPEC.json OUT.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[0]).read_text())
    results = asyncio.run(run_spec(spec))
    Path(argv[1]).write_text(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

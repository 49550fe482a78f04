"""Where a request's time goes in the entry: `python -m bench.phases [--concurrency 16]`.

Starts `graft serve` on the benchmark model with bench/phase_hook on PYTHONPATH: its
sitecustomize patches the serving process (uvicorn's HTTP protocol, the routes' body parser,
the gateway, the in-process inference call) to stamp each request's phases with
time.monotonic(), which is one clock for every process here. It also records every
garbage collection over 1 ms or of generation 2, and every stall of the event loop over 5 ms.
Then the load generator drives /classify, then gRPC Classify, closed loop, one after the
other on the same server, and the summary compares them (per-request phases, the serving
thread's CPU per request, the client's percentiles). `--no-phases` serves without the hook:
the CPU and latency figures to compare before and after a change.
Writes bench/results/phases/summary.md (and the raw records beside it).
"""

import argparse
import asyncio
import gc
import json
import os
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import numpy as np

from bench.config import QUICK, RESULTS_DIR
from bench.images import REPO_ROOT, data_dir

HOOK_DIR = Path(__file__).parent / "phase_hook"
OUT_ENV = "GRAFT_BENCH_PHASES_DIR"
STALL_S = 0.005  # event-loop lateness worth recording
PROBE_S = 0.005  # how often the loop probe wakes up

Record = dict[str, Any]
_current: ContextVar[Record | None] = ContextVar("graft_bench_phases", default=None)
_records: deque[Record] = deque()
_gc_started: list[float] = [0.0]
_probe: list[asyncio.Task[None]] = []


def _now() -> float:
    return time.monotonic()


# -- inside the server ---------------------------------------------------------------------


def install() -> None:
    """Patch this process; records go to $GRAFT_BENCH_PHASES_DIR/phases-<pid>.jsonl."""
    out = Path(os.environ[OUT_ENV]) / f"phases-{os.getpid()}.jsonl"
    _patch_uvicorn()
    gc.callbacks.append(_gc_timed)
    threading.Thread(target=_patch_graft_when_imported, daemon=True).start()
    threading.Thread(target=_flush_forever, args=(out,), daemon=True).start()


def _stamp(key: str) -> None:
    record = _current.get()
    if record is not None:
        record[key] = _now()


def _patch_uvicorn() -> None:
    from uvicorn.protocols.http import httptools_impl

    protocol, cycle = httptools_impl.HttpToolsProtocol, httptools_impl.RequestResponseCycle
    begin, headers, complete = (
        protocol.on_message_begin,
        protocol.on_headers_complete,
        protocol.on_message_complete,
    )
    run_asgi, send = cycle.run_asgi, cycle.send

    def on_message_begin(self: Any) -> None:
        self.bench_begin = _now()
        begin(self)

    def on_headers_complete(self: Any) -> None:
        headers(self)  # creates the cycle and its task, which has not run yet
        self.cycle.bench = {"begin": self.bench_begin, "headers": _now()}

    def on_message_complete(self: Any) -> None:
        if self.cycle is not None and hasattr(self.cycle, "bench"):
            self.cycle.bench["body"] = _now()
        complete(self)

    async def timed_run_asgi(self: Any, app: Any) -> None:
        record = getattr(self, "bench", {})
        record.update(task=_now(), path=self.scope.get("path"), proto="http")
        _current.set(record)
        _start_probe()
        try:
            await run_asgi(self, app)
        finally:
            record["done"] = _now()
            _records.append(record)

    async def timed_send(self: Any, message: Any) -> None:
        record = getattr(self, "bench", None)
        if record is not None and message["type"] == "http.response.start":
            record["resp_start"] = _now()
        await send(self, message)
        last = message["type"] == "http.response.body" and not message.get("more_body", False)
        if record is not None and last:
            record["resp_sent"] = _now()

    protocol.on_message_begin = on_message_begin
    protocol.on_headers_complete = on_headers_complete
    protocol.on_message_complete = on_message_complete
    cycle.run_asgi = timed_run_asgi
    cycle.send = timed_send


def _patch_graft_when_imported() -> None:
    """The serving modules import late (the BentoML worker imports the service): wait."""
    while getattr(sys.modules.get("service.app.entry"), "Graft", None) is None:
        time.sleep(0.05)
    from service.app import in_process
    from service.gateway import gateway
    from service.protocol.http import guard, routes

    routes.classify_input = _around(routes.classify_input, "parse_start", "parse_end")
    guard.RequestGuard.__call__ = _around(guard.RequestGuard.__call__, "guard", "guard_end")
    in_process.InProcessInference.infer = _around(
        in_process.InProcessInference.infer, "infer_start", "infer_end"
    )
    classify = gateway.Gateway.classify

    async def timed_classify(self: Any, *args: Any, **kwargs: Any) -> Any:
        record = _current.get()
        if record is None:  # gRPC: no HTTP cycle made one
            record = {"proto": kwargs.get("protocol", "?")}
            _current.set(record)
            _start_probe()
        record["gw_start"] = _now()
        try:
            return await classify(self, *args, **kwargs)
        finally:
            record["gw_end"] = _now()
            if record["proto"] != "http":
                _records.append(record)

    gateway.Gateway.classify = timed_classify


def _around(function: Callable[..., Any], start: str, end: str) -> Callable[..., Any]:
    async def timed(*args: Any, **kwargs: Any) -> Any:
        _stamp(start)
        try:
            return await function(*args, **kwargs)
        finally:
            _stamp(end)

    return timed


def _gc_timed(phase: str, info: dict[str, int]) -> None:
    if phase == "start":
        _gc_started[0] = _now()
        return
    took = _now() - _gc_started[0]
    if took > 0.001 or info["generation"] == 2:
        main = threading.current_thread() is threading.main_thread()
        _records.append({"gc": info["generation"], "at": _gc_started[0], "s": took, "main": main})


def _start_probe() -> None:
    if not _probe:
        _probe.append(asyncio.get_running_loop().create_task(_watch_loop()))


async def _watch_loop() -> None:
    """Records how late the event loop wakes a sleeper: what every callback waited then."""
    while True:
        asked = _now()
        await asyncio.sleep(PROBE_S)
        late = _now() - asked - PROBE_S
        if late > STALL_S:
            _records.append({"stall": late, "at": asked + PROBE_S})


def _flush_forever(out: Path) -> None:
    while True:
        time.sleep(1.0)
        lines = []
        while _records:
            lines.append(json.dumps(_records.popleft()))
        if lines:
            with out.open("a") as file:
                file.write("\n".join(lines) + "\n")


# -- the orchestrator ------------------------------------------------------------------------


def _thread_cpu_s(pid: int, tid: int) -> float:
    fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _process_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _serving_worker(root_pid: int) -> int:
    """The BentoML worker of the `graft` service (in one process it also runs inference)."""
    import psutil

    for proc in psutil.Process(root_pid).children(recursive=True):
        words = proc.cmdline()
        if "--service-name" in words and words[words.index("--service-name") + 1] == "graft":
            return proc.pid
    raise SystemExit("no BentoML worker of the graft service found")


def idle_cpu_rate(worker: int, seconds: float = 5.0) -> tuple[float, float]:
    """CPU seconds per second the idle worker spends (status polls, gRPC's timers): taken off
    the loaded figure, so that CPU per request is the requests' own."""
    before = _thread_cpu_s(worker, worker), _process_cpu_s(worker)
    time.sleep(seconds)
    after = _thread_cpu_s(worker, worker), _process_cpu_s(worker)
    return (after[0] - before[0]) / seconds, (after[1] - before[1]) / seconds


def drive(
    target: dict[str, Any],
    args: argparse.Namespace,
    work: Path,
    worker: int,
    idle: tuple[float, float],
) -> Record:
    """One closed-loop run; the serving worker's CPU over its measured window, less idle."""
    label = target["kind"]
    spec = {
        "target": target,
        "images": {"dir": str(data_dir()), "count": QUICK.images},
        "runs": [
            {
                "mode": "closed",
                "concurrency": args.concurrency,
                "warmup_s": args.warmup,
                "duration_s": args.duration,
            }
        ],
        "keep_samples": True,
        "started_file": str(work / f"{label}.started"),
    }
    spec_path, out = work / f"{label}.spec.json", work / f"{label}.out.json"
    spec_path.write_text(json.dumps(spec))
    started = Path(spec["started_file"])
    started.unlink(missing_ok=True)
    loadgen = subprocess.Popen(
        [sys.executable, "-m", "bench.loadgen", str(spec_path), str(out)], cwd=REPO_ROOT
    )
    while not started.exists() or not started.read_text():
        time.sleep(0.05)
    begin = float(started.read_text()) + args.warmup
    time.sleep(max(begin - _now(), 0))
    cpu0 = _thread_cpu_s(worker, worker), _process_cpu_s(worker)
    time.sleep(args.duration)
    cpu1 = _thread_cpu_s(worker, worker), _process_cpu_s(worker)
    if loadgen.wait() != 0:
        raise SystemExit(f"the load generator failed on {label}")
    result = json.loads(out.read_text())[0]
    served = max(result["requests"] - result["errors"], 1)
    return {
        "label": label,
        "window": result["window"],
        "result": result,
        "loop_cpu_ms": 1000 * (cpu1[0] - cpu0[0] - idle[0] * args.duration) / served,
        "process_cpu_ms": 1000 * (cpu1[1] - cpu0[1] - idle[1] * args.duration) / served,
    }


# (name, from, to): the phases of an HTTP request, in order
HTTP_PHASES = [
    ("headers read", "begin", "headers"),
    ("task start", "headers", "task"),
    ("BentoML middlewares in", "task", "guard"),
    ("guard to handler", "guard", "parse_start"),
    ("body + multipart", "parse_start", "parse_end"),
    ("gateway before inference", "gw_start", "infer_start"),
    ("inference (queue + batch)", "infer_start", "infer_end"),
    ("gateway after inference", "infer_end", "gw_end"),
    ("answer built + middlewares", "gw_end", "resp_start"),
    ("answer written", "resp_start", "resp_sent"),
    ("after the answer", "resp_sent", "done"),
    ("server total", "begin", "resp_sent"),
]
GRPC_PHASES = [
    ("gateway before inference", "gw_start", "infer_start"),
    ("inference (queue + batch)", "infer_start", "infer_end"),
    ("gateway after inference", "infer_end", "gw_end"),
    ("gateway total", "gw_start", "gw_end"),
]


def _ms(values: list[float], q: float) -> str:
    return f"{1000 * float(np.percentile(values, q)):.1f}" if values else "-"


def _phase_table(records: list[Record], phases: list[tuple[str, str, str]]) -> list[str]:
    total_key = phases[-1]
    totals = [r[total_key[2]] - r[total_key[1]] for r in records]
    slow_cut = np.percentile(totals, 99) if totals else 0
    slow = [r for r, t in zip(records, totals, strict=True) if t >= slow_cut]
    lines = ["| phase | p50 ms | p99 ms | mean of the slowest 1 % ms |", "|---|---|---|---|"]
    for name, start, end in phases:
        spans = [r[end] - r[start] for r in records if start in r and end in r]
        slow_spans = [r[end] - r[start] for r in slow if start in r and end in r]
        mean_slow = f"{1000 * float(np.mean(slow_spans)):.1f}" if slow_spans else "-"
        lines.append(f"| {name} | {_ms(spans, 50)} | {_ms(spans, 99)} | {mean_slow} |")
    return lines


def _read_records(work: Path) -> list[Record]:
    records = []
    for path in work.glob("phases-*.jsonl"):
        records += [json.loads(line) for line in path.read_text().splitlines() if line]
    return records


def _in(window: list[float], at: float) -> bool:
    return window[0] <= at <= window[1]


def summarize(runs: list[Record], records: list[Record]) -> str:
    lines = []
    for run in runs:
        window, result = run["window"], run["result"]
        latencies = [s[1] for s in result["samples"] if s[2] is None and _in(window, s[0])]
        lines += [
            f"## {run['label']}",
            "",
            f"{result['requests']} requests, {result['errors']} errors, "
            f"{result['throughput_ips']:.1f} img/s; client latency p50 {_ms(latencies, 50)} "
            f"p90 {_ms(latencies, 90)} p99 {_ms(latencies, 99)} ms; serving worker CPU per "
            f"request (less its idle rate): event-loop thread {run['loop_cpu_ms']:.2f} ms, "
            f"whole process {run['process_cpu_ms']:.2f} ms",
            "",
        ]
        if run["label"] == "graft-http":
            mine = [
                r
                for r in records
                if r.get("proto") == "http" and r.get("path") == "/classify"
                if "resp_sent" in r and _in(window, r["begin"])
            ]
            phases = HTTP_PHASES
        else:
            mine = [
                r
                for r in records
                if r.get("proto") == "grpc" and "gw_end" in r
                if _in(window, r["gw_start"])
            ]
            phases = GRPC_PHASES
        if mine:
            lines += [*_phase_table(mine, phases), ""]
        stalls = [r["stall"] for r in records if "stall" in r and _in(window, r["at"])]
        gcs = [r for r in records if "gc" in r and _in(window, r["at"])]
        gen2 = [r["s"] for r in gcs if r["gc"] == 2]
        lines += [
            f"Event-loop stalls over {1000 * STALL_S:.0f} ms: {len(stalls)}, "
            f"p50 {_ms(stalls, 50)} ms, max {_ms(stalls, 100)} ms, "
            f"{sum(stalls):.2f} s in all; garbage collections over 1 ms or of generation 2: "
            f"{len(gcs)} ({len(gen2)} of generation 2, max {_ms(gen2, 100)} ms)",
            "",
        ]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    from bench.__main__ import resolve_model
    from bench.servers import graft

    parser = argparse.ArgumentParser(prog="python -m bench.phases", description=__doc__)
    parser.add_argument("--model", default="auto")
    parser.add_argument("--model-root", type=Path, default=REPO_ROOT / "models")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--no-phases", action="store_true", help="serve without the hook")
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE for graft serve")
    args = parser.parse_args(argv)
    model = resolve_model(args.model_root.resolve(), args.model)
    work = RESULTS_DIR / "phases"
    work.mkdir(parents=True, exist_ok=True)
    for old in work.glob("phases-*.jsonl"):
        old.unlink()
    env = dict(item.split("=", 1) for item in args.env)
    if not args.no_phases:
        path = os.pathsep.join([str(HOOK_DIR), str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])
        env.update({"PYTHONPATH": path.rstrip(os.pathsep), OUT_ENV: str(work)})
    with graft(model, "phases", env) as server:
        worker = _serving_worker(server.process.pid)
        idle = idle_cpu_rate(worker)
        http = {"kind": "graft-http", "url": server.url, "model": model.name}
        grpc = {"kind": "graft-grpc", "address": server.grpc_address, "model": model.name}
        runs = [drive(target, args, work, worker, idle) for target in (http, grpc)]
        time.sleep(1.5)  # the hook flushes every second
    summary = work / "summary.md"
    title = f"# Phases at {args.concurrency} clients, `python -m bench.phases {' '.join(argv)}`"
    summary.write_text(f"{title}\n\n{summarize(runs, _read_records(work))}")
    print(summary.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

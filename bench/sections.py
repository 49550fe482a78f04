"""Each benchmark section: start what it needs, drive load, return a JSON-able result.

Every section writes bench/results/<section>.json on its own, so a run can be resumed or
repeated one section at a time (`python -m bench --only tutorial,kserve`).
"""

import json
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from bench.ceiling import summarize as ceiling_summary
from bench.config import BENCH_DIR, RESULTS_DIR, Profile
from bench.images import REPO_ROOT
from bench.meta import contention
from bench.procs import Server, TreeSampler
from bench.servers import Model
from bench.stats import Sample, percentiles_ms

WORK = RESULTS_DIR / "work"


@dataclass(frozen=True)
class Context:
    profile: Profile
    quick: bool
    model: Model
    images_dir: Path
    python: str  # the venv interpreter that runs the load generator and the ceiling
    graft_env: dict[str, str] = field(default_factory=dict)  # extra GRAFT_* for graft servers

    def images(self) -> dict[str, Any]:
        return {"dir": str(self.images_dir), "count": self.profile.images}


def _subprocess_json(ctx: Context, module: str, spec: dict[str, Any], tag: str) -> Any:
    WORK.mkdir(parents=True, exist_ok=True)
    spec_path, out_path = WORK / f"{tag}.spec.json", WORK / f"{tag}.out.json"
    spec_path.write_text(json.dumps(spec))
    out_path.unlink(missing_ok=True)
    done = subprocess.run(
        [ctx.python, "-m", module, str(spec_path), str(out_path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{module} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(out_path.read_text())


def closed_run(ctx: Context, concurrency: int) -> dict[str, Any]:
    p = ctx.profile
    return {
        "mode": "closed",
        "concurrency": concurrency,
        "warmup_s": p.warmup_s,
        "duration_s": p.duration_s,
    }


def open_run(ctx: Context, rate: float) -> dict[str, Any]:
    p = ctx.profile
    return {"mode": "open", "rate": rate, "warmup_s": p.warmup_s, "duration_s": p.duration_s}


def load(
    ctx: Context,
    target: dict[str, Any],
    run: dict[str, Any],
    server: Server | None,
    tag: str,
    keep_samples: bool = False,
) -> dict[str, Any]:
    """One load run in a separate load-generator process, annotated with the server's CPU
    and with the CPU that other processes on the machine took meanwhile."""
    target = {"client": http_client(), **target}
    spec = {"target": target, "images": ctx.images(), "runs": [run], "keep_samples": keep_samples}
    result = _subprocess_json(ctx, "bench.loadgen", spec, tag)[0]
    result["client"] = target["client"] if target["kind"] != "graft-grpc" else "grpc.aio"
    _print_run(tag, annotate(result, server.sampler if server else None))
    return result


def annotate(result: dict[str, Any], sampler: TreeSampler | None) -> dict[str, Any]:
    """Add the server's CPU over the span the load generator metered, and the share of the
    machine that other processes took meanwhile (above CONTENTION_THRESHOLD the run is
    flagged). Ours: the server's tree, the load generator and this orchestrator, each counted
    over that one span."""
    start, end = result.get("cpu_window") or result["window"]  # older results: the window
    server_cpu = sampler.cpu_seconds(start, end) if sampler else 0.0
    harness_cpu = sampler.harness_cpu_seconds(start, end) if sampler else 0.0
    own = server_cpu + harness_cpu + result["loadgen_cpu_s"]
    result.update(
        server_cpu_cores=server_cpu / (end - start),
        **contention(result["machine_busy_cpu_s"], own, end - start),
    )
    return result


def http_client() -> str:
    return os.environ.get("GRAFT_BENCH_HTTP_CLIENT", "raw")


def _print_run(tag: str, r: dict[str, Any]) -> None:
    what = f"c={r['concurrency']}" if r["mode"] == "closed" else f"rate={r['rate']:.1f}/s"
    flag = "  [measured under contention]" if r.get("contended") else ""
    print(
        f"  {tag:<16} {what:<12} {r['throughput_ips']:7.1f} img/s  p50 "
        f"{r['latency_ms']['p50']:7.1f}  p99 {r['latency_ms']['p99']:7.1f} ms  errors "
        f"{r['errors']}{flag}",
        flush=True,
    )


def open_rates(ctx: Context) -> list[float]:
    """Open-loop rates as fractions of the measured ceiling, so every server gets the very
    same offered load; none if the ceiling was never measured."""
    path = RESULTS_DIR / "ceiling.json"
    if not path.exists():
        return []
    best = json.loads(path.read_text()).get("best_throughput_ips")
    return [round(best * f, 1) for f in ctx.profile.open_fractions] if best else []


def metric_samples(url: str, family_name: str) -> list[Any]:
    """Every sample of one metric family on a server's /metrics; none if it cannot be read
    or has no such metric (the columns that need it then stay empty)."""
    try:
        text = httpx.get(f"{url}/metrics", timeout=10).text
    except httpx.HTTPError:
        return []
    return [
        sample
        for family in text_string_to_metric_families(text)
        if family.name == family_name
        for sample in family.samples
    ]


def batch_stats(url: str) -> tuple[float, float]:
    """(sum, count) of graft_inference_batch_size over every label set."""
    samples = metric_samples(url, "graft_inference_batch_size")
    total = sum(s.value for s in samples if s.name.endswith("_sum"))
    return total, sum(s.value for s in samples if s.name.endswith("_count"))


def served_runtime(url: str, model: Model) -> str | None:
    """The runtime graft runs `model`'s version on (graft_model_runtime), None if unknown."""
    for sample in metric_samples(url, "graft_model_runtime"):
        labels = sample.labels
        ours = (labels.get("model"), labels.get("version")) == (model.name, str(model.version))
        if ours and sample.value >= 1:
            return labels.get("runtime")
    return None


def server_runs(
    ctx: Context,
    target: dict[str, Any],
    server: Server,
    tag: str,
    open_loop: bool,
    levels: tuple[int, ...] | None = None,
) -> list[dict[str, Any]]:
    runs = [closed_run(ctx, c) for c in (levels or ctx.profile.levels)]
    if open_loop:
        runs += [open_run(ctx, rate) for rate in open_rates(ctx)]
    return [load(ctx, target, run, server, tag) for run in runs]


def server_summary(
    server: Server, runs: list[dict[str, Any]], runtime: str | None = None
) -> dict[str, Any]:
    first = min((r["window"][0] for r in runs), default=float("inf"))
    return {
        # which server start this was: sections compared "on the same start" check these
        "pid": server.process.pid,
        "ready_at": server.ready_at,
        "startup_s": server.startup_s,
        "runtime": runtime,  # what runs the network: T5 and T13 compare like with like
        "memory_startup": server.sampler.peak(0.0, server.ready_at),
        "memory_idle": server.sampler.peak(server.ready_at, first),
        "memory_under_load": server.sampler.peak(first),
    }


# -- sections --------------------------------------------------------------------------------


def calibration(ctx: Context, server: Server) -> dict[str, Any]:
    """The load generator against a do-nothing server: the most it can send, and its CPU per
    request, to set beside the servers' rates (it must be far faster than any of them). Both
    HTTP clients are measured, so the choice of the raw one stays checkable."""
    levels = (16,) if ctx.quick else (16, 64)
    runs = []
    for client in ("raw", "httpx"):
        target = {"kind": "tutorial", "url": server.url, "model": "-", "client": client}
        for level in levels if client == "raw" else (16,):
            runs.append(load(ctx, target, closed_run(ctx, level), server, f"loadgen-{client}"))
    return {"runs": runs, "server": server_summary(server, runs)}


def ceiling_runtimes(ctx: Context) -> tuple[list[str], dict[str, str]]:
    """(runtimes to measure, runtime -> why not): TensorFlow always; with the model's ONNX
    file the runtime graft will serve it on, and in the full profile every other one
    installed here."""
    from service.runtime.networks import ACCELERATED, TENSORFLOW, RuntimeUnavailable, installed
    from service.runtime.networks import resolve as resolve_runtime

    setting = ctx.graft_env.get("GRAFT_RUNTIME") or os.environ.get("GRAFT_RUNTIME") or "auto"
    try:
        wanted = [resolve_runtime(setting)]
    except RuntimeUnavailable as exc:
        wanted, skipped = [], {setting: str(exc)}
    else:
        skipped = {}
    if ctx.profile.ceiling_runtimes == "all":
        wanted += [r for r in ACCELERATED if installed(r)]
    accelerated = [r for r in dict.fromkeys(wanted) if r != TENSORFLOW]
    if accelerated and ctx.model.onnx is None:
        skipped.update(
            {r: f"{ctx.model.name} v{ctx.model.version} has no ONNX file" for r in accelerated}
        )
        accelerated = []
    return [TENSORFLOW, *accelerated], skipped


def ceiling(ctx: Context) -> dict[str, Any]:
    p = ctx.profile
    runtimes, skipped = ceiling_runtimes(ctx)
    for runtime, why in skipped.items():
        print(f"  ceiling          {runtime} not measured: {why}", flush=True)
    spec = {
        "model_dir": str(ctx.model.path),
        "images": ctx.images(),
        "runtimes": runtimes,
        "batch_sizes": list(p.ceiling_batches),
        "callers": list(p.ceiling_callers),
        "warmup_calls": 1 if ctx.quick else 3,
        "duration_s": p.ceiling_duration_s,
    }
    rows = _subprocess_json(ctx, "bench.ceiling", spec, "ceiling")
    for row in rows:
        flag = "  [measured under contention]" if row["contended"] else ""
        print(
            f"  ceiling          {row['runtime']:<11} batch={row['batch_size']:<3} "
            f"callers={row['callers']:<2} {row['throughput_ips']:7.1f} img/s  p50 "
            f"{row['latency_ms']['p50']:7.1f} ms{flag}",
            flush=True,
        )
    return ceiling_summary(rows, skipped)


def graft_http(ctx: Context, server: Server) -> dict[str, Any]:
    """POST /classify (multipart): the closed-loop levels, then the shared open-loop rates."""
    return graft_batched(ctx, server, "graft-http", open_loop=True)


def graft_v2(ctx: Context, server: Server) -> dict[str, Any]:
    """POST /v2/models/{name}/infer with binary tensor data, on graft-http's server start:
    the closed-loop levels, judged against /classify at 16 clients (T9)."""
    return graft_batched(ctx, server, "graft-v2", open_loop=False)


def graft_batched(
    ctx: Context,
    server: Server,
    kind: str,
    open_loop: bool,
    levels: tuple[int, ...] | None = None,
) -> dict[str, Any]:
    """Load runs against a graft HTTP route, each with the mean inference batch size it got."""
    target = {"kind": kind, "url": server.url, "model": ctx.model.name}
    plan = [closed_run(ctx, c) for c in (levels or ctx.profile.levels)]
    if open_loop:
        plan += [open_run(ctx, rate) for rate in open_rates(ctx)]
    runs = []
    for run in plan:
        before = batch_stats(server.url)
        result = load(ctx, target, run, server, kind)
        after = batch_stats(server.url)
        batches = after[1] - before[1]
        result["mean_batch_size"] = (after[0] - before[0]) / batches if batches else None
        runs.append(result)
    return {
        "runs": runs,
        "server": server_summary(server, runs, served_runtime(server.url, ctx.model)),
    }


def graft_grpc(ctx: Context, server: Server) -> dict[str, Any]:
    target = {"kind": "graft-grpc", "address": server.grpc_address, "model": ctx.model.name}
    runs = server_runs(ctx, target, server, "graft-grpc", open_loop=False)
    runtime = served_runtime(server.url, ctx.model)
    return {"runs": runs, "server": server_summary(server, runs, runtime)}


# The runtime each peer runs the network on; graft's own is read from its /metrics.
PEER_RUNTIMES = {"tutorial": "tensorflow", "tutorial-onnx": "onnxruntime", "kserve": "tensorflow"}


def peer(ctx: Context, server: Server, kind: str, open_loop: bool = True) -> dict[str, Any]:
    """Closed-loop levels (+ the shared open-loop rates) against one HTTP server."""
    target = {"kind": kind, "url": server.url, "model": ctx.model.name}
    open_loop = open_loop and ctx.profile.peer_open_loop
    levels = ctx.profile.peer_levels
    runs = server_runs(ctx, target, server, server.name, open_loop=open_loop, levels=levels)
    runtime = PEER_RUNTIMES.get(server.name) or served_runtime(server.url, ctx.model)
    return {"runs": runs, "server": server_summary(server, runs, runtime)}


def training(ctx: Context) -> dict[str, Any]:
    """Delegates to bench/training_bench.py (owned by the training workstream) in its own
    process, so the minutes of TensorFlow training never share memory with the harness."""
    if not (BENCH_DIR / "training_bench.py").exists():
        raise RuntimeError("bench/training_bench.py (the training workstream's) is not there yet")
    code = (
        "import json, sys; from bench.training_bench import run; "
        "json.dump(run(quick=sys.argv[1] == '1'), open(sys.argv[2], 'w'))"
    )
    out = WORK / "training.out.json"
    WORK.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    done = subprocess.run(
        [ctx.python, "-c", code, "1" if ctx.quick else "0", str(out)], cwd=REPO_ROOT, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"bench.training_bench.run failed (exit {done.returncode})")
    return {"figures": json.loads(out.read_text())}


def gpu(ctx: Context) -> dict[str, Any]:
    """graft on an NVIDIA GPU, only where one is visible (else servers.Unavailable, one line):
    the network alone at batch sizes 1..256 on the GPU, graft's decode per CPU core, and
    `graft serve` with GRAFT_DEVICE=gpu at 1, 16, 64 and 256 clients (bench/gpu.py)."""
    from bench import gpu as gpu_bench
    from bench import servers

    device = gpu_bench.require_gpu()
    onnx = ctx.model.require_onnx()
    p = ctx.profile
    sweep_spec = {
        "part": "sweep",
        "onnx": str(onnx),
        "device": str(device),
        "batch_sizes": list(gpu_bench.SWEEP_BATCHES),
        "image_size": ctx.model.image_size,
        "duration_s": p.ceiling_duration_s / 2,
    }
    sweep = _subprocess_json(ctx, "bench.gpu", sweep_spec, "gpu-sweep")
    for row in sweep:
        print(
            f"  gpu network      batch={row['batch_size']:<4} {row['throughput_ips']:9.1f} img/s"
            f"  p50 {row['latency_ms']['p50']:7.2f} ms",
            flush=True,
        )
    decode_spec = {
        "part": "decode",
        "model_dir": str(ctx.model.path),
        "images": ctx.images(),
        "workers": sorted({1, len(os.sched_getaffinity(0))}),
        "duration_s": p.ceiling_duration_s,
    }
    decode = _subprocess_json(ctx, "bench.gpu", decode_spec, "gpu-decode")
    for row in decode:
        print(
            f"  gpu decode       workers={row['workers']:<3} {row['throughput_ips']:8.1f} img/s "
            f"({row['images_per_cpu_s']:.1f} per CPU-second)",
            flush=True,
        )
    env = {**ctx.graft_env, "GRAFT_DEVICE": str(device)}
    with servers.graft(ctx.model, "graft-gpu", env) as server:
        served = graft_batched(ctx, server, "graft-http", open_loop=False, levels=gpu_bench.LEVELS)
    return {"device": str(device), "sweep": sweep, "decode": decode, **served}


# -- version switch --------------------------------------------------------------------------


def analyze_switch(
    samples: list[Sample], window: tuple[float, float], published_at: float, old: int, new: int
) -> dict[str, Any]:
    """Steady = requests started before the publish; switch = requests started from the
    publish until every answer comes from the new version (+1 s); after = the rest."""
    inside = [s for s in samples if window[0] <= s.start < window[1]]
    new_done = [s.start + s.latency_s for s in inside if s.version == new]
    old_done = [s.start + s.latency_s for s in inside if s.version == old]
    switched_at = max([min(new_done, default=float("inf")), *old_done])
    settled = switched_at + 1.0

    def ok_ms(a: float, b: float) -> dict[str, float]:
        return percentiles_ms([s.latency_s for s in inside if a <= s.start < b and not s.error])

    errors = [s for s in inside if s.error]
    steady, during = ok_ms(window[0], published_at), ok_ms(published_at, settled)
    return {
        "switched": bool(new_done),
        "switch_delay_s": (min(new_done) - published_at) if new_done else None,
        "errors": len(errors),
        "error_kinds": {
            k: sum(1 for s in errors if s.error == k) for k in {s.error for s in errors}
        },
        "requests": len(inside),
        "requests_by_version": {
            str(v): sum(1 for s in inside if s.version == v) for v in (old, new)
        },
        "latency_ms_steady": steady,
        "latency_ms_switch": during,
        "latency_ms_after": ok_ms(settled, window[1]),
        "p99_ratio": during["p99"] / steady["p99"] if steady["p99"] else None,
        "switch_window": [published_at, settled],
        "timeline": timeline(inside, published_at, new),
    }


def timeline(samples: list[Sample], origin: float, new: int, step: float = 1.0) -> list[dict]:
    """Per-second buckets (by request start, relative to the publish) for the switch plot."""
    buckets: dict[int, list[Sample]] = {}
    for s in samples:
        buckets.setdefault(int((s.start - origin) // step), []).append(s)
    rows = []
    for key in sorted(buckets):
        bucket = buckets[key]
        ok = [s for s in bucket if not s.error]
        lat = percentiles_ms([s.latency_s for s in ok])
        rows.append(
            {
                "t": key * step,
                "requests": len(bucket),
                "errors": len(bucket) - len(ok),
                "p50_ms": lat["p50"],
                "p99_ms": lat["p99"],
                "new_share": sum(1 for s in ok if s.version == new) / max(len(ok), 1),
            }
        )
    return rows


def switch(ctx: Context, server: Server) -> dict[str, Any]:
    """Concurrency 16 against graft; a new version is published part-way through."""
    from service.store.repository import ModelRepository

    p = ctx.profile
    run = {
        "mode": "closed",
        "concurrency": 16,
        "warmup_s": p.warmup_s,
        "duration_s": p.switch_duration_s,
    }
    target = {"kind": "graft-http", "url": server.url, "model": ctx.model.name}
    WORK.mkdir(parents=True, exist_ok=True)
    spec_path, out_path = WORK / "switch.spec.json", WORK / "switch.out.json"
    started = WORK / "switch.started"
    started.unlink(missing_ok=True)
    spec = {
        "target": {"client": http_client(), **target},
        "images": ctx.images(),
        "runs": [run],
        "keep_samples": True,
        "started_file": str(started),
    }
    spec_path.write_text(json.dumps(spec))
    loadgen = subprocess.Popen(
        [ctx.python, "-m", "bench.loadgen", str(spec_path), str(out_path)], cwd=REPO_ROOT
    )
    repository = ModelRepository(_served_root(server))
    begin = _wait_for_start(started, loadgen)
    time.sleep(max(begin + p.warmup_s + p.switch_duration_s * p.switch_at - time.monotonic(), 0))
    published_at = time.monotonic()
    new = repository.publish(ctx.model.path, ctx.model.name)
    if loadgen.wait() != 0:
        raise RuntimeError("the load generator failed during the switch run")
    result = annotate(json.loads(out_path.read_text())[0], server.sampler)
    samples = [Sample(*row) for row in result.pop("samples")]
    analysis = analyze_switch(samples, tuple(result["window"]), published_at, new - 1, new)
    a, b = analysis["switch_window"]
    analysis["memory_steady"] = server.sampler.peak(result["window"][0], published_at)
    analysis["memory_switch"] = server.sampler.peak(a, b + 5.0)
    print(
        f"  switch           v{new - 1}->v{new} after {analysis['switch_delay_s']} s, errors "
        f"{analysis['errors']}, p99 steady {analysis['latency_ms_steady']['p99']:.1f} ms, "
        f"during {analysis['latency_ms_switch']['p99']:.1f} ms",
        flush=True,
    )
    return {"run": result, **analysis}


def _wait_for_start(started: Path, loadgen: subprocess.Popen[bytes]) -> float:
    """The load generator's start (monotonic), once it has loaded its images."""
    while not started.exists() or not started.read_text():
        if loadgen.poll() is not None:
            raise RuntimeError(f"the load generator exited ({loadgen.returncode}) before starting")
        time.sleep(0.1)
    return float(started.read_text())


def _served_root(server: Server) -> Path:
    return RESULTS_DIR / "work" / f"{server.name}-repository"

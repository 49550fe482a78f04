"""`python -m bench.sweep --set KEY=V1,V2 [--set ...]`: graft's settings swept on one model.

Every combination of the values given (the Cartesian product, in order) gets its own
`graft serve` start and closed-loop runs at `--levels` against `/classify` (or gRPC), with
the mean inference batch size each run got and the contention flag; `--rounds 2` repeats
the whole grid in the same order, so the machine's drift hits every combination alike.
Prints one table, best first, and writes bench/results/sweep.json; BENCHMARKS.md is not
touched. For the batcher and the runtime, e.g.:

    python -m bench.sweep --set GRAFT_MAX_BATCH_SIZE=2,4,8 --set GRAFT_BATCH_THREADS=1,2,3 \\
        --set GRAFT_RUNTIME=onnxruntime --levels 16 --warmup 3 --duration 10
"""

import argparse
import itertools
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench import sections, servers
from bench.__main__ import resolve_model
from bench.config import QUICK, RESULTS_DIR, VENV_BIN
from bench.images import REPO_ROOT, data_dir
from bench.meta import run_meta
from bench.sections import Context


def _setting(text: str) -> tuple[str, list[str]]:
    key, sep, values = text.partition("=")
    if not sep or not key or not values:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE[,VALUE...]")
    return key, values.split(",")


def _levels(text: str) -> tuple[int, ...]:
    try:
        levels = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected client counts, e.g. 4,16") from None
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: client counts are positive integers")
    return levels


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.sweep",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--set",
        dest="settings",
        type=_setting,
        action="append",
        required=True,
        metavar="KEY=V1,V2",
        help="a graft setting and the values to try (repeatable)",
    )
    parser.add_argument("--levels", type=_levels, default=(16,), help="clients, e.g. 1,16")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds per run, excluded")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds measured per run")
    parser.add_argument("--rounds", type=int, default=1, help="times the whole grid is run")
    parser.add_argument("--route", choices=("http", "grpc"), default="http")
    parser.add_argument("--model", default="auto", help="as `python -m bench --model`")
    parser.add_argument("--model-root", type=Path, default=REPO_ROOT / "models")
    return parser.parse_args(argv)


def grid(settings: list[tuple[str, list[str]]]) -> list[dict[str, str]]:
    """Every combination of the values, the first setting varying slowest."""
    keys = [key for key, _ in settings]
    return [
        dict(zip(keys, values, strict=True))
        for values in itertools.product(*(v for _, v in settings))
    ]


def measure(ctx: Context, env: dict[str, str], route: str) -> dict[str, Any]:
    """One graft start with `env`: the closed-loop levels of ctx's profile."""
    with servers.graft(ctx.model, "sweep", env) as server:
        if route == "grpc":
            return sections.graft_grpc(ctx, server)
        return sections.graft_batched(ctx, server, "graft-http", open_loop=False)


def table(points: list[dict[str, Any]], levels: tuple[int, ...]) -> list[str]:
    """One row per measured point, best first by throughput at the highest level."""
    top = max(levels)

    def throughput(point: dict[str, Any], level: int) -> float:
        run = next((r for r in point["runs"] if r["concurrency"] == level), None)
        return run["throughput_ips"] if run else float("nan")

    head = "| settings | round | runtime | " + " | ".join(
        f"c={c} img/s | c={c} p99 ms | c={c} batch" for c in levels
    )
    lines = [head + " | contended |", "|---|---|---|" + "---|---|---|" * len(levels) + "---|"]
    for point in sorted(points, key=lambda p: -throughput(p, top) if p["ok"] else 0.0):
        settings = " ".join(f"{k}={v}" for k, v in point["env"].items())
        if not point["ok"]:
            lines.append(f"| {settings} | {point['round']} | FAILED: {point['error'][:80]} |")
            continue
        cells = []
        for level in levels:
            run = next(r for r in point["runs"] if r["concurrency"] == level)
            batch = run.get("mean_batch_size")
            cells.append(
                f"{run['throughput_ips']:.1f} | {run['latency_ms']['p99']:.0f} | "
                + (f"{batch:.2f}" if batch else "–")
            )
        contended = any(r.get("contended") for r in point["runs"])
        runtime = point["server"].get("runtime") or "?"
        lines.append(
            f"| {settings} | {point['round']} | {runtime} | "
            + " | ".join(cells)
            + f" | {'yes' if contended else 'no'} |"
        )
    return lines


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    model = resolve_model(args.model_root.resolve(), args.model)
    profile = replace(QUICK, levels=args.levels, warmup_s=args.warmup, duration_s=args.duration)
    python = str(VENV_BIN / "python") if (VENV_BIN / "python").exists() else sys.executable
    ctx = Context(profile, False, model, data_dir(), python)
    combinations = grid(args.settings)
    print(
        f"[sweep] {len(combinations)} combinations x {args.rounds} rounds on {model.name}",
        flush=True,
    )
    meta = {**run_meta(False), "command": " ".join(["python -m bench.sweep", *argv])}
    out = RESULTS_DIR / "sweep.json"
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    points: list[dict[str, Any]] = []
    for round_, env in itertools.product(range(1, args.rounds + 1), combinations):
        print(f"[sweep] round {round_}: {' '.join(f'{k}={v}' for k, v in env.items())}", flush=True)
        started = time.monotonic()
        try:
            point = {"ok": True, **measure(ctx, env, args.route)}
        except Exception as exc:  # one setting that breaks graft must not end the sweep
            point = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        elapsed = time.monotonic() - started
        points.append({"env": env, "round": round_, "elapsed_s": elapsed, **point})
        # rewritten after every point, so an interrupted sweep keeps what it measured
        body = {"meta": meta, "route": args.route, "levels": args.levels, "points": points}
        out.write_text(json.dumps(body, indent=1, default=str))
    print("\n".join(table(points, args.levels)))
    print(f"[sweep] wrote {out}")
    return 0 if all(p["ok"] for p in points) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Soak check: minutes at ~80% of measured capacity with hostile inputs mixed in.

    python -m bench.soak --model-root models --model colours          # starts graft serve
    python -m bench.soak --model-root models --layout both            # one process, then two
    python -m bench.soak --url http://127.0.0.1:3000 --pid 1234         # a running server

1. Capacity: a closed loop (`--concurrency` clients) for `--capacity-s` seconds -> req/s, of
   the soak's own mix (every `--bad-every`-th request a hostile input, the slow ones aside:
   they hold a connection for the server's timeout, not its CPU), so that `--load` of it is
   that fraction of what the server can do with the hostile inputs in the traffic.
2. Primer: every hostile input once (bench/soak_inputs.py: what a client can send against
   issue 10's and issue 17's limits, over HTTP and gRPC), so that every label set a legitimate
   answer creates exists before /metrics is counted.
3. Soak: an open loop (fixed-rate arrivals, so a slow server cannot slow the offered load) at
   `--load` x capacity for `--duration-s`; every `--bad-every`-th request is the next hostile
   input, cycling through them. Throughout, /livez is probed every 100 ms from a process of
   its own and the memory of each server process is sampled (bench/soak_watch.py).
4. Pass when: every good request got 200; every hostile one got the answer it must (its 4xx,
   gRPC code or a closed connection; never a 5xx, never a hang); no /livez probe took
   `--livez-limit-s` (1 s) or failed; no /metrics label holds a name or version a request
   made up, and /metrics gained at most `--series-tolerance` label sets after the primer; the
   server's resident memory (RSS over its process tree) grew less than `--max-rss-growth`
   from the start of the soak to its end.

Started by the soak, `graft serve` gets gRPC, an admin token (so the management cases run with
the right token too) and `--header-timeout-s` / `--body-timeout-s` (short, so that slow-client
cases finish within a short soak). Writes the figures as JSON to `--out`, per layout; exits 1
when a check fails.
"""

import argparse
import asyncio
import io
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.procs import free_port, tree
from bench.soak_inputs import RANDOM_NAME, BadCase, Clients, bad_cases
from bench.soak_watch import LivezProbe, MemoryWatch, metrics_snapshot
from bench.targets import multipart
from bench.transport import make_transport

LAYOUTS = {"one": "false", "separate": "true"}  # GRAFT_SEPARATE_INFERENCE
MADE_UP = re.compile(RANDOM_NAME.pattern + "|xxxxxxxxxxxxxxxx")  # request data in a label
GOOD_CONCURRENCY = 256


@dataclass
class Tally:
    statuses: Counter = field(default_factory=Counter)
    good_not_200: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    bad: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    unexpected: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Target:
    url: str
    pid: int | None
    grpc_target: str | None
    token: str | None
    header_timeout_s: float
    body_timeout_s: float


# -- inputs ----------------------------------------------------------------------------------------


def good_images(count: int = 16) -> list[bytes]:
    """Real photos (scikit-image's samples) as 256x256 JPEGs."""
    from PIL import Image
    from skimage import data

    photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    out = []
    for index in range(count):
        image = Image.fromarray(photos[index % len(photos)]).resize((256, 256))
        image = image.rotate(index * 7)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=85 + index % 10)
        out.append(buffer.getvalue())
    return out


def mixed_requests(
    transport: object, photos: list[bytes], cases: list[BadCase], bad_every: int
) -> Iterator[tuple[object, BadCase | None]]:
    """Good requests (prepared /classify uploads), every `bad_every`-th one the next case."""
    prepare = transport.request_bytes  # type: ignore[attr-defined]
    good = [prepare("/classify", *multipart({}, "images", photo)) for photo in photos]
    index = 0
    while True:
        index += 1
        if bad_every and cases and index % bad_every == 0:
            yield None, cases[(index // bad_every) % len(cases)]
        else:
            yield good[index % len(good)], None


# -- load ------------------------------------------------------------------------------------------


async def _good(transport: object, request: object, tally: Tally) -> None:
    started = time.monotonic()
    try:
        status = (await transport.post(request)).status  # type: ignore[attr-defined]
    except Exception as error:  # a failed connection is a finding, never a crashed soak
        tally.errors[type(error).__name__] += 1
        return
    tally.latencies.append(time.monotonic() - started)
    tally.statuses[status] += 1
    if status != 200:
        tally.good_not_200[status] += 1


async def _bad(clients: Clients, case: BadCase, tally: Tally) -> None:
    try:
        outcome = await case.send(clients)
    except Exception as error:  # the soak's own bug, or a client failure: a finding either way
        outcome = f"error:{type(error).__name__}"
    tally.bad[case.name][outcome] += 1
    if outcome.isdigit():
        tally.statuses[int(outcome)] += 1
    if outcome not in case.expected:
        tally.unexpected.append(f"{case.name}: {outcome}")


async def capacity(
    target: Target,
    model: str,
    photos: list[bytes],
    cases: list[BadCase],
    args: argparse.Namespace,
) -> float:
    """Requests per second a closed loop of `args.concurrency` clients achieves on the soak's
    mix: good requests answered 200 and hostile ones answered as they must be count, nothing
    else (a 503 is no capacity). Slow cases are left out (see the module's docstring)."""
    transport = make_transport("raw", target.url, args.concurrency)
    clients = _clients(target, model)
    fast = [case for case in cases if not case.slow]
    requests = mixed_requests(transport, photos, fast, args.bad_every)
    done = 0
    deadline = time.monotonic() + args.capacity_s

    async def client() -> None:
        nonlocal done
        while time.monotonic() < deadline:
            request, case = next(requests)
            if case is None:
                done += (await transport.post(request)).status == 200  # type: ignore[attr-defined]
            else:
                done += await _answered_as_expected(case, clients)

    started = time.monotonic()
    try:
        await asyncio.gather(*(client() for _ in range(args.concurrency)))
    finally:
        await transport.close()
        await clients.close()
        await clients.http.aclose()
    return done / (time.monotonic() - started)


async def _answered_as_expected(case: BadCase, clients: Clients) -> bool:
    try:
        return await case.send(clients) in case.expected
    except Exception:  # a client failure: no capacity (the soak itself records it as a finding)
        return False


def _clients(target: Target, model: str) -> Clients:
    return Clients(
        http=httpx.AsyncClient(base_url=target.url, timeout=120),
        url=target.url,
        model=model,
        token=target.token,
        grpc_target=target.grpc_target,
        header_timeout_s=target.header_timeout_s,
        body_timeout_s=target.body_timeout_s,
    )


async def prime(target: Target, model: str, cases: list[BadCase], tally: Tally, burst: int) -> None:
    """Every case once (the fast ones one after another, the slow ones beside them), then
    `burst` copies of each heavy case at once: the worst memory these inputs can cost (three
    batch threads of four 40 MP images, issue 17 item 6)."""
    clients = _clients(target, model)
    try:
        slow = [asyncio.create_task(_bad(clients, c, tally)) for c in cases if c.slow]
        for case in cases:
            if not case.slow:
                await _bad(clients, case, tally)
        heavy = [c for c in cases if c.heavy] * burst
        await asyncio.gather(*slow, *(_bad(clients, case, tally) for case in heavy))
    finally:
        await clients.close()
        await clients.http.aclose()


async def soak(
    target: Target,
    model: str,
    photos: list[bytes],
    cases: list[BadCase],
    rate: float,
    seconds: float,
    bad_every: int,
) -> tuple[Tally, list[tuple[float, int]]]:
    # httpx, not the raw client: at a fixed rate some pooled connections sit idle past the
    # server's keep-alive timeout, and httpx notices a closed one before reusing it.
    transport = make_transport("httpx", target.url, GOOD_CONCURRENCY)
    clients = _clients(target, model)
    tally, rss = Tally(), [(0.0, tree_rss(target.pid))]
    requests = mixed_requests(transport, photos, cases, bad_every)
    pending: set[asyncio.Task] = set()
    started = time.monotonic()
    sent = 0
    next_rss = started + 10
    while (now := time.monotonic()) < started + seconds:
        due = int((now - started) * rate) - sent
        for _ in range(max(0, due)):
            request, case = next(requests)
            work = _good(transport, request, tally) if case is None else _bad(clients, case, tally)
            task = asyncio.create_task(work)
            pending.add(task)
            task.add_done_callback(pending.discard)
            sent += 1
        if now >= next_rss:
            rss.append((now - started, tree_rss(target.pid)))
            next_rss += 10
        await asyncio.sleep(0.002)
    await asyncio.gather(*pending)
    rss.append((time.monotonic() - started, tree_rss(target.pid)))
    await transport.close()
    await clients.close()
    await clients.http.aclose()
    return tally, rss


def tree_rss(pid: int | None) -> int:
    if pid is None:
        return 0
    total = 0
    for process in tree(pid):
        with suppress(Exception):
            total += process.memory_info().rss
    return total


# -- server ----------------------------------------------------------------------------------------


@contextmanager
def started_server(
    model_root: Path,
    model: str,
    layout: str = "one",
    header_timeout_s: float = 5.0,
    body_timeout_s: float = 10.0,
) -> Iterator[Target]:
    """`graft serve` on free ports (HTTP and gRPC) in its own session, with an admin token."""
    port, grpc_port = free_port(), free_port()
    token = secrets.token_hex(16)
    command = [
        str(Path(sys.executable).parent / "graft"), "serve", "--model-root", str(model_root),
        "--port", str(port), "--grpc-port", str(grpc_port), "--default-model", model,
    ]  # fmt: skip
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("GRAFT_")},
        "GRAFT_SEPARATE_INFERENCE": LAYOUTS[layout],
        "GRAFT_ADMIN_TOKEN": token,
        "GRAFT_HEADER_TIMEOUT_S": str(header_timeout_s),
        "GRAFT_BODY_TIMEOUT_S": str(body_timeout_s),
    }
    log = open(Path(tempfile.gettempdir()) / f"graft-soak-{port}.log", "wb")  # noqa: SIM115
    process = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(process, url, log.name)
        yield Target(
            url, process.pid, f"127.0.0.1:{grpc_port}", token, header_timeout_s, body_timeout_s
        )
    finally:
        children = tree(process.pid)  # BentoML's workers run in sessions of their own
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        with suppress(subprocess.TimeoutExpired):
            process.wait(30)
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        for child in children:
            with suppress(Exception):
                child.kill()
        log.close()


def _wait_ready(process: subprocess.Popen, url: str, log: str) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"graft serve exited early; see {log}")
        with suppress(httpx.HTTPError):
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        time.sleep(1)
    raise SystemExit(f"graft serve not ready after 300 s; see {log}")


# -- report ----------------------------------------------------------------------------------------


def verdict(
    tally: Tally, rss: list[tuple[float, int]], args: argparse.Namespace, watched: dict[str, Any]
) -> dict[str, Any]:
    fives = sum(count for status, count in tally.statuses.items() if status >= 500)
    intended = sum(
        count for outcomes in tally.bad.values() for o, count in outcomes.items() if o == "503"
    )
    start, end = rss[0][1], rss[-1][1]
    growth = (end - start) / start if start else None
    livez, series = watched["livez"], watched["metrics"]
    checks = {
        "no_5xx_but_intended_503": fives == intended,
        "bad_inputs_as_expected": not tally.unexpected,
        "good_inputs_all_200": not tally.good_not_200,
        "no_connection_errors": not tally.errors,
        "livez_within_limit": livez["max_ms"] < args.livez_limit_s * 1000 and not livez["failures"],
        "metrics_series_stable": series["growth"] <= args.series_tolerance
        and not series["made_up"],
        "rss_growth_ok": growth is None or growth < args.max_rss_growth,
    }
    latencies = np.array(tally.latencies or [0.0])
    return {
        "passed": all(checks.values()),
        "checks": checks,
        "requests": sum(tally.statuses.values()),
        "statuses": {str(k): v for k, v in sorted(tally.statuses.items())},
        "five_xx": fives,
        "good_not_200": {str(k): v for k, v in tally.good_not_200.items()},
        "bad_outcomes": {name: dict(outcomes) for name, outcomes in sorted(tally.bad.items())},
        "unexpected": dict(Counter(tally.unexpected)),
        "connection_errors": dict(tally.errors),
        "latency_ms": {
            q: round(float(np.percentile(latencies, p)) * 1000, 1)
            for q, p in (("p50", 50), ("p95", 95), ("p99", 99))
        },
        "rss_mib": {
            "start": start / 2**20,
            "end": end / 2**20,
            "peak": max(r for _, r in rss) / 2**20,
        },
        "rss_growth": growth,
        "rss_samples": [(round(t, 1), r) for t, r in rss],
        **watched,
    }


def _merge(primer: Tally, tally: Tally) -> Tally:
    for name, outcomes in primer.bad.items():
        tally.bad[name].update(outcomes)
    tally.unexpected = primer.unexpected + tally.unexpected
    tally.statuses.update(primer.statuses)
    return tally


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak", description=__doc__.split("\n")[0]
    )
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="A running server, e.g. http://127.0.0.1:3000.")
    where.add_argument("--model-root", type=Path, help="Start graft serve on this repository.")
    parser.add_argument("--pid", type=int, help="With --url: the server's root process, for RSS.")
    parser.add_argument("--grpc", help="With --url: its gRPC address (host:port) for gRPC cases.")
    parser.add_argument("--token", help="With --url: its admin token, for the management cases.")
    parser.add_argument("--model", default="imagenet", help="Default model (with --model-root).")
    parser.add_argument(
        "--layout",
        choices=("one", "separate", "both"),
        default="one",
        help="With --model-root: one process, a separate inference process, or both in turn.",
    )
    parser.add_argument(
        "--header-timeout-s",
        type=float,
        default=5.0,
        help="The server's GRAFT_HEADER_TIMEOUT_S (set when the soak starts it).",
    )
    parser.add_argument(
        "--body-timeout-s",
        type=float,
        default=10.0,
        help="The server's GRAFT_BODY_TIMEOUT_S (set when the soak starts it).",
    )
    parser.add_argument("--duration-s", type=float, default=600.0)
    parser.add_argument("--capacity-s", type=float, default=30.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--load", type=float, default=0.8, help="Fraction of measured capacity.")
    parser.add_argument("--rate", type=float, help="Requests/s; skips the capacity measurement.")
    parser.add_argument("--bad-every", type=int, default=50)
    parser.add_argument(
        "--worst-burst",
        type=int,
        default=3,
        help="Copies of each heavy input sent at once after the primer.",
    )
    parser.add_argument("--max-rss-growth", type=float, default=0.10)
    parser.add_argument("--livez-limit-s", type=float, default=1.0)
    parser.add_argument(
        "--series-tolerance",
        type=int,
        default=16,
        help="Label sets /metrics may gain after the primer (bounded ones appear late: a "
        "batch's protocol mix, the first 503); a leak of request data shows as one per request.",
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/soak.json"))
    return parser.parse_args(argv)


def run(args: argparse.Namespace, target: Target) -> dict[str, Any]:
    photos = good_images()
    cases = bad_cases(photos[0], target.token, target.grpc_target is not None)
    memory = MemoryWatch(target.pid)
    memory.start()
    if args.rate:
        measured, rate = None, args.rate
    else:
        measured = asyncio.run(capacity(target, args.model, photos, cases, args))
        rate = args.load * measured
    livez = LivezProbe(target.url).start()
    try:
        primer = Tally()
        asyncio.run(prime(target, args.model, cases, primer, args.worst_burst))
        baseline = metrics_snapshot(target.url)
        print(
            f"soak: {rate:.1f} req/s for {args.duration_s:.0f} s (capacity {measured}), "
            f"{len(cases)} hostile inputs",
            flush=True,
        )
        tally, rss = asyncio.run(
            soak(target, args.model, photos, cases, rate, args.duration_s, args.bad_every)
        )
        final = metrics_snapshot(target.url)
    finally:
        watched_livez = livez.stop()
        watched_memory = memory.stop()
    added = sorted(final["series"] - baseline["series"])
    made_up = sorted(s for s in final["series"] if MADE_UP.search(s))
    watched = {
        "livez": watched_livez,
        "metrics": {
            "series_after_primer": len(baseline["series"]),
            "series_end": len(final["series"]),
            "growth": len(final["series"]) - len(baseline["series"]),
            "added": added[:20],
            "made_up": made_up[:20],
            "bytes_after_primer": baseline["bytes"],
            "bytes_end": final["bytes"],
        },
        "memory_mib": watched_memory,
    }
    result = verdict(_merge(primer, tally), rss, args, watched)
    return {
        "capacity_rps": measured,
        "rate_rps": rate,
        "duration_s": args.duration_s,
        "bad_every": args.bad_every,
        "header_timeout_s": target.header_timeout_s,
        "body_timeout_s": target.body_timeout_s,
        "bad_kinds": [
            {"name": c.name, "item": c.item, "expected": sorted(c.expected)} for c in cases
        ],
        **result,
    }


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    results: dict[str, Any] = {}
    if args.model_root:
        for layout in ("one", "separate") if args.layout == "both" else (args.layout,):
            timeouts = (args.header_timeout_s, args.body_timeout_s)
            with started_server(args.model_root, args.model, layout, *timeouts) as target:
                results[layout] = run(args, target)
    else:
        target = Target(
            args.url, args.pid, args.grpc, args.token, args.header_timeout_s, args.body_timeout_s
        )
        results["given"] = run(args, target)
    passed = all(result["passed"] for result in results.values())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"passed": passed, "layouts": results}, indent=2) + "\n")
    keys = ("passed", "checks", "requests", "five_xx", "unexpected", "livez", "memory_mib")
    summary = {layout: {k: r[k] for k in keys} for layout, r in results.items()}
    print(json.dumps(summary, indent=2))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

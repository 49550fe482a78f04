"""Soak check: minutes at ~80% of measured capacity, a bad input every 50 requests.

    python -m bench.soak --model-root models --model colours          # starts graft serve
    python -m bench.soak --url http://127.0.0.1:3000 --pid 1234         # a running server

1. Capacity: a closed loop (`--concurrency` clients) for `--capacity-s` seconds -> req/s.
2. Soak: an open loop (fixed-rate arrivals, so a slow server cannot slow the offered load) at
   `--load` x capacity for `--duration-s`; every `--bad-every`-th request is a hostile input
   (truncated JPEG, HTML renamed .jpg, zero bytes, a 20000x20000 PNG bomb, a pickle body,
   malformed JSON, text/plain), cycling through them.
3. Pass when: no 5xx at all, every bad input got a 4xx, every good one a 200, and the server's
   resident memory (RSS summed over its process tree) grew less than `--max-rss-growth`
   between the start and the end of the soak.

Writes the figures as JSON to `--out` and exits 1 when a check fails.
"""

import argparse
import asyncio
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

from bench.procs import free_port, tree
from bench.targets import multipart
from bench.transport import make_transport

Prepared = tuple[object, bool]  # (request bytes, is it a bad input)


@dataclass
class Tally:
    statuses: Counter = field(default_factory=Counter)
    bad_not_4xx: list[str] = field(default_factory=list)
    good_not_200: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)


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


def _png_bomb(side: int = 20_000) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body).to_bytes(4, "big")
        return len(body).to_bytes(4, "big") + kind + body + crc

    deflate = zlib.compressobj(9)
    row = b"\x00" * (1 + (side + 7) // 8)
    idat = b"".join(deflate.compress(row) for _ in range(side)) + deflate.flush()
    header = side.to_bytes(4, "big") * 2 + bytes([1, 0, 0, 0, 0])
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


def bad_requests(photo: bytes) -> list[tuple[str, bytes, str]]:
    """(name, body, content type) of hostile requests to POST /classify."""
    form = "images"
    return [
        ("truncated jpeg", *multipart({}, form, photo[: len(photo) // 2])),
        ("html as jpeg", *multipart({}, form, b"<!DOCTYPE html><html>hi</html>")),
        ("zero bytes", *multipart({}, form, b"")),
        ("png bomb", *multipart({}, form, _png_bomb())),
        ("pickle body", b"\x80\x04N.", "application/vnd.bentoml+pickle"),
        ("malformed json", b'{"images": [{"b64": ', "application/json"),
        ("bad base64", json.dumps({"images": [{"b64": "@@@"}]}).encode(), "application/json"),
        ("text/plain", b"hello", "text/plain"),
    ]  # fmt: skip


def mixed_requests(transport: object, photos: list[bytes], bad_every: int) -> Iterator[Prepared]:
    prepare = transport.request_bytes  # type: ignore[attr-defined]
    good = [prepare("/classify", *multipart({}, "images", photo)) for photo in photos]
    bad = [prepare("/classify", body, kind) for _, body, kind in bad_requests(photos[0])]
    index = 0
    while True:
        index += 1
        if bad_every and index % bad_every == 0:
            yield bad[(index // bad_every) % len(bad)], True
        else:
            yield good[index % len(good)], False


# -- load ------------------------------------------------------------------------------------------


async def _one(transport: object, request: object, bad: bool, tally: Tally) -> None:
    started = time.monotonic()
    try:
        status = (await transport.post(request)).status  # type: ignore[attr-defined]
    except Exception as error:  # a failed connection is a finding, never a crashed soak
        tally.errors[type(error).__name__] += 1
        return
    tally.latencies.append(time.monotonic() - started)
    tally.statuses[status] += 1
    if bad and not 400 <= status < 500:
        tally.bad_not_4xx.append(str(status))
    if not bad and status != 200:
        tally.good_not_200[status] += 1


async def capacity(url: str, photos: list[bytes], concurrency: int, seconds: float) -> float:
    """Requests per second a closed loop of `concurrency` clients achieves (good images only)."""
    transport = make_transport("raw", url, concurrency)
    requests = [transport.request_bytes("/classify", *multipart({}, "images", p)) for p in photos]
    done = 0
    deadline = time.monotonic() + seconds

    async def client(offset: int) -> None:
        nonlocal done
        index = offset
        while time.monotonic() < deadline:
            status = (await transport.post(requests[index % len(requests)])).status
            index += concurrency
            done += status == 200

    started = time.monotonic()
    await asyncio.gather(*(client(i) for i in range(concurrency)))
    await transport.close()
    return done / (time.monotonic() - started)


async def soak(
    url: str, photos: list[bytes], rate: float, seconds: float, bad_every: int, pid: int | None
) -> tuple[Tally, list[tuple[float, int]]]:
    # httpx, not the raw client: at a fixed rate some pooled connections sit idle past the
    # server's keep-alive timeout, and httpx notices a closed one before reusing it.
    transport = make_transport("httpx", url, 256)
    tally, rss = Tally(), [(0.0, tree_rss(pid))]
    requests = mixed_requests(transport, photos, bad_every)
    pending: set[asyncio.Task] = set()
    started = time.monotonic()
    sent = 0
    next_rss = started + 10
    while (now := time.monotonic()) < started + seconds:
        due = int((now - started) * rate) - sent
        for _ in range(max(0, due)):
            request, bad = next(requests)
            task = asyncio.create_task(_one(transport, request, bad, tally))
            pending.add(task)
            task.add_done_callback(pending.discard)
            sent += 1
        if now >= next_rss:
            rss.append((now - started, tree_rss(pid)))
            next_rss += 10
        await asyncio.sleep(0.002)
    await asyncio.gather(*pending)
    rss.append((time.monotonic() - started, tree_rss(pid)))
    await transport.close()
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
def started_server(model_root: Path, model: str) -> Iterator[tuple[str, int]]:
    """`graft serve` on a free port in its own session; yields (url, pid)."""
    port = free_port()
    command = [
        str(Path(sys.executable).parent / "graft"), "serve", "--model-root", str(model_root),
        "--port", str(port), "--grpc-port", "0", "--default-model", model,
    ]  # fmt: skip
    log = open(Path(tempfile.gettempdir()) / f"graft-soak-{port}.log", "wb")  # noqa: SIM115
    process = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise SystemExit(f"graft serve exited early; see {log.name}")
            with suppress(httpx.HTTPError):
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            time.sleep(1)
        else:
            raise SystemExit(f"graft serve not ready after 300 s; see {log.name}")
        yield url, process.pid
    finally:
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        with suppress(subprocess.TimeoutExpired):
            process.wait(30)
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        log.close()


# -- report ----------------------------------------------------------------------------------------


def verdict(tally: Tally, rss: list[tuple[float, int]], max_growth: float) -> dict[str, object]:
    fives = sum(count for status, count in tally.statuses.items() if status >= 500)
    start, end = rss[0][1], rss[-1][1]
    growth = (end - start) / start if start else None
    checks = {
        "zero_5xx": fives == 0,
        "bad_inputs_all_4xx": not tally.bad_not_4xx,
        "good_inputs_all_200": not tally.good_not_200,
        "no_connection_errors": not tally.errors,
        "rss_growth_ok": growth is None or growth < max_growth,
    }
    latencies = np.array(tally.latencies or [0.0])
    return {
        "passed": all(checks.values()),
        "checks": checks,
        "requests": sum(tally.statuses.values()),
        "statuses": {str(k): v for k, v in sorted(tally.statuses.items())},
        "five_xx": fives,
        "good_not_200": {str(k): v for k, v in tally.good_not_200.items()},
        "bad_not_4xx": tally.bad_not_4xx[:20],
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
    }


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak", description=__doc__.split("\n")[0]
    )
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="A running server, e.g. http://127.0.0.1:3000.")
    where.add_argument("--model-root", type=Path, help="Start graft serve on this repository.")
    parser.add_argument("--pid", type=int, help="With --url: the server's root process, for RSS.")
    parser.add_argument("--model", default="imagenet", help="Default model (with --model-root).")
    parser.add_argument("--duration-s", type=float, default=600.0)
    parser.add_argument("--capacity-s", type=float, default=30.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--load", type=float, default=0.8, help="Fraction of measured capacity.")
    parser.add_argument("--rate", type=float, help="Requests/s; skips the capacity measurement.")
    parser.add_argument("--bad-every", type=int, default=50)
    parser.add_argument("--max-rss-growth", type=float, default=0.10)
    parser.add_argument("--out", type=Path, default=Path("bench/results/soak.json"))
    return parser.parse_args(argv)


def run(args: argparse.Namespace, url: str, pid: int | None) -> dict[str, object]:
    photos = good_images()
    if args.rate:
        measured, rate = None, args.rate
    else:
        measured = asyncio.run(capacity(url, photos, args.concurrency, args.capacity_s))
        rate = args.load * measured
    print(f"soak: {rate:.1f} req/s for {args.duration_s:.0f} s (capacity {measured})", flush=True)
    tally, rss = asyncio.run(soak(url, photos, rate, args.duration_s, args.bad_every, pid))
    result = verdict(tally, rss, args.max_rss_growth)
    bad = bad_requests(photos[0])
    return {
        "capacity_rps": measured,
        "rate_rps": rate,
        "duration_s": args.duration_s,
        "bad_every": args.bad_every,
        "bad_kinds": [name for name, _, _ in bad],
        **result,
    }


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.model_root:
        with started_server(args.model_root, args.model) as (url, pid):
            result = run(args, url, pid)
    else:
        result = run(args, args.url, args.pid)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    summary = {k: result[k] for k in ("passed", "checks", "requests", "five_xx", "rss_growth")}
    print(json.dumps(summary, indent=2))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

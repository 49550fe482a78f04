"""The caller's latency with and without shadow traffic, at N clients on /classify.

    python -m bench.shadow --model-root models --model imagenet  # 16 clients, 3 rounds of 30 s

One graft serves a scratch repository that holds the model's version twice: v1 (the stable
version) and v2, published as a candidate, so it serves only as the shadow. Each round
measures a closed loop of N clients (bench.loadgen, its own process) first with no shadow
(`{"pin": null}`), then with `{"shadow": {"version": 2, "rate": R}}`, the two interleaved so
that a neighbour's load hits both alike. Prints one JSON document: per round and mode, the
caller's p50/p95/p99, throughput and errors, and with the shadow the figures GET /models
shows (images compared, dropped by reason). Shadow images run only while no caller's image
waits for inference (the batcher's background lane), so at 16 clients most samples are dropped
(`queue_full`, or `busy` at their deadline): that is the point, the caller's figures must not
move.
"""

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.config import RESULTS_DIR, VENV_BIN
from bench.images import REPO_ROOT, data_dir, shown
from bench.procs import free_port, http_ok, serve

TOKEN = "bench-shadow-token-0123456789"
ADMIN = {"authorization": f"Bearer {TOKEN}"}


def scratch_repository(source: Path, name: str) -> Path:
    """`source` (an export or a version folder) as v1 and as the candidate v2 of `name`."""
    from service.store.promotion import publish_candidate
    from service.store.repository import ModelRepository

    root = RESULTS_DIR / "work" / "shadow-repository"
    shutil.rmtree(root, ignore_errors=True)
    repository = ModelRepository(root)
    repository.publish(source, name)
    publish_candidate(repository, source, name)
    return root


def _policy(url: str, name: str, policy: dict[str, Any]) -> None:
    response = httpx.put(f"{url}/models/{name}/policy", json=policy, headers=ADMIN, timeout=60)
    response.raise_for_status()


def _status(url: str, name: str) -> dict[str, Any]:
    models = httpx.get(f"{url}/models", headers=ADMIN, timeout=60).json()["models"]
    return next(m for m in models if m["name"] == name)


def _wait_loaded(url: str, name: str, version: int, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        states = {v["version"]: v["state"] for v in _status(url, name)["versions"]}
        if states.get(version) == "AVAILABLE":
            return
        time.sleep(0.5)
    raise RuntimeError(f"version {version} of {name} never loaded")


def _load(url: str, name: str, args: argparse.Namespace) -> dict[str, Any]:
    spec = {
        "target": {"kind": "graft-http", "url": url, "model": name},
        "images": {"dir": str(data_dir()), "count": args.images},
        "runs": [{"mode": "closed", "concurrency": args.clients, "warmup_s": args.warmup,
                  "duration_s": args.duration}],
    }  # fmt: skip
    with tempfile.TemporaryDirectory() as work:
        spec_file, out_file = Path(work) / "spec.json", Path(work) / "out.json"
        spec_file.write_text(json.dumps(spec))
        command = [sys.executable, "-m", "bench.loadgen", str(spec_file), str(out_file)]
        subprocess.run(command, check=True, cwd=REPO_ROOT)
        run = json.loads(out_file.read_text())[0]
    keys = ("requests", "errors", "error_kinds", "throughput_ips", "latency_ms", "versions")
    return {key: run[key] for key in keys}


def measure(url: str, name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for round_index in range(args.rounds):
        for mode in ("off", "shadow"):
            shadow = {"shadow": {"version": 2, "rate": args.rate}} if mode == "shadow" else {}
            _policy(url, name, shadow or {"pin": None})
            if shadow:
                _wait_loaded(url, name, 2)
            row = {"round": round_index, "mode": mode, **_load(url, name, args)}
            if shadow:
                row["shadow"] = (_status(url, name).get("traffic") or {}).get("shadow")
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.shadow", description=__doc__)
    parser.add_argument("--model-root", type=Path, default=REPO_ROOT / "models")
    parser.add_argument("--model", default="imagenet")
    parser.add_argument("--version", type=int, default=1)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--rate", type=float, default=1.0, help="the shadow's sampling rate")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=30.0, help="seconds per mode and round")
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--images", type=int, default=64)
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    source = args.model_root / args.model / str(args.version)
    root = scratch_repository(source, args.model)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    graft_bin = VENV_BIN / "graft"
    cmd = [str(graft_bin) if graft_bin.exists() else "graft", "serve", "--model-root", str(root),
           "--host", "127.0.0.1", "--port", str(port), "--grpc-port", "0",
           "--default-model", args.model]  # fmt: skip
    env = {"GRAFT_ADMIN_TOKEN": TOKEN, "GRAFT_POLL_INTERVAL_S": "0.5"}
    with serve("shadow", cmd, env=env, ready=http_ok(f"{url}/readyz"), url=url,
               log_dir=RESULTS_DIR / "logs", cwd=REPO_ROOT):  # fmt: skip
        rows = measure(url, args.model, args)
    conditions = {
        "clients": args.clients,
        "rate": args.rate,
        "duration_s": args.duration,
        "model": f"{args.model} v{args.version}",
        "images": shown(data_dir()),
    }
    print(json.dumps({"conditions": conditions, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

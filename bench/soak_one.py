"""Each heavy hostile input alone: what it costs the entry and the inference process.

    python -m bench.soak_one --model-root models --model imagenet --layout separate
    python -m bench.soak_one --model-root models --case "40 MP PNG (valid: classified)"

Starts `graft serve` as the soak does (bench/soak.py), then for each case (by default every
heavy one of bench/soak_inputs.py), one after another on the idle server: resets each server
process's peak RSS (`5` into /proc/PID/clear_refs sets VmHWM to the current RSS), sends the
case once, waits for its answer, and reports per process role the RSS before, the peak
(VmHWM) during and the growth, with the case's outcome, its wall time and the time the batch
threads spent on it (the growth of graft_inference_duration_seconds_sum: decode + network of
the batches it was in). Writes JSON to `--out`; exits 1 when a case's outcome is not one it
must get.
"""

import argparse
import asyncio
import json
import re
import sys
import time
from contextlib import suppress
from pathlib import Path
from typing import Any

import httpx

from bench.procs import tree
from bench.soak import LAYOUTS, Target, _clients, good_images, started_server
from bench.soak_inputs import BadCase, bad_cases
from bench.soak_watch import memory_by_role

_INFERENCE_SUM = re.compile(r"^graft_inference_duration_seconds_sum\{[^}]*\}\s+(\S+)$", re.M)


def reset_peaks(root_pid: int) -> None:
    """Every process under `root_pid` starts a new VmHWM from its RSS now (Linux >= 4.0)."""
    for process in tree(root_pid):
        with suppress(OSError):
            Path(f"/proc/{process.pid}/clear_refs").write_text("5")


def batch_seconds(url: str) -> float:
    """Seconds the batch threads have spent in model calls so far (every model, version)."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return sum(float(value) for value in _INFERENCE_SUM.findall(text))


def size_case(target: Target, model: str, case: BadCase) -> dict[str, Any]:
    assert target.pid is not None  # started by this module
    reset_peaks(target.pid)
    before, busy = memory_by_role(target.pid), batch_seconds(target.url)
    started = time.monotonic()
    outcome = asyncio.run(_send(target, model, case))
    wall = time.monotonic() - started
    after = memory_by_role(target.pid)
    roles = {}
    for role, values in after.items():
        rss = before.get(role, values)["rss"]
        roles[role] = {
            "rss_before_mib": round(rss / 1024, 1),
            "hwm_mib": round(values["hwm"] / 1024, 1),
            "growth_mib": round((values["hwm"] - rss) / 1024, 1),
        }
    return {
        "case": case.name,
        "outcome": outcome,
        "expected": sorted(case.expected),
        "wall_s": round(wall, 3),
        "batch_thread_s": round(batch_seconds(target.url) - busy, 3),
        "memory": roles,
    }


async def _send(target: Target, model: str, case: BadCase) -> str:
    clients = _clients(target, model)
    try:
        return await case.send(clients)
    finally:
        await clients.close()
        await clients.http.aclose()


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak_one", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--model-root", type=Path, required=True)
    parser.add_argument("--model", default="imagenet")
    parser.add_argument("--layout", choices=tuple(LAYOUTS), default="separate")
    parser.add_argument(
        "--case",
        action="append",
        help="A case's exact name (repeatable); default: every heavy case.",
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/soak_one.json"))
    return parser.parse_args(argv)


def chosen(cases: list[BadCase], names: list[str] | None) -> list[BadCase]:
    if not names:
        return [case for case in cases if case.heavy]
    by_name = {case.name: case for case in cases}
    unknown = [name for name in names if name not in by_name]
    if unknown:
        raise SystemExit(f"no such case: {unknown}; the cases are {sorted(by_name)}")
    return [by_name[name] for name in names]


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    photo = good_images(1)[0]
    with started_server(args.model_root, args.model, args.layout) as target:
        cases = chosen(bad_cases(photo, target.token, True), args.case)
        sized = [size_case(target, args.model, case) for case in cases]
    passed = all(result["outcome"] in result["expected"] for result in sized)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"layout": args.layout, "passed": passed, "cases": sized}
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

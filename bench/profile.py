"""Profile graft under load: `python -m bench.profile [--concurrency 16] [--duration 30]`.

Starts `graft serve` on the benchmark model, drives it with the load generator (its own
process), and samples every process of the server with py-spy (`--subprocesses`,
non-blocking, so the server is not paused). Writes the raw stacks to bench/results/ and a
summary, the functions with the most samples on their own (self) and under them
(inclusive), per process, to docs/bench/profile-summary.md, with an SVG flame graph beside it.
Needs py-spy (`pip install -e '.[bench]'`); ptrace must be allowed (root, or
kernel.yama.ptrace_scope=0).
"""

import argparse
import json
import shutil
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

from bench.__main__ import resolve_model
from bench.config import PLOTS_DIR, QUICK, RESULTS_DIR, VENV_BIN
from bench.images import REPO_ROOT, data_dir
from bench.servers import graft

TOP = 25


def py_spy() -> str:
    found = VENV_BIN / "py-spy"
    if found.exists():
        return str(found)
    if path := shutil.which("py-spy"):
        return path
    raise SystemExit("py-spy not found: pip install -e '.[bench]' (or pip install py-spy)")


def summarize(raw: Path) -> str:
    """Collapsed stacks ('frame;frame;... count') -> markdown tables of the hottest frames."""
    self_time: dict[str, Counter[str]] = defaultdict(Counter)
    inclusive: dict[str, Counter[str]] = defaultdict(Counter)
    totals: Counter[str] = Counter()
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        # With --subprocesses a worker's stack sits under its parent's "process ..." frame:
        # attribute each sample to the innermost process.
        cut = max((i for i, f in enumerate(frames) if f.startswith("process ")), default=-1)
        process = _process_name(frames[cut]) if cut >= 0 else "process"
        frames = frames[cut + 1 :]
        if not frames:
            continue
        n = int(count)
        totals[process] += n
        self_time[process][frames[-1]] += n
        for frame in set(frames):
            inclusive[process][frame] += n
    lines = [f"Samples per process: {dict(totals)}", ""]
    for process, total in totals.most_common():
        lines += [f"### {process}", "", "| self % | frame |", "|---|---|"]
        lines += [
            f"| {100 * n / total:.1f} | `{frame[:140]}` |"
            for frame, n in self_time[process].most_common(TOP)
        ]
        lines += ["", "| inclusive % | frame |", "|---|---|"]
        lines += [
            f"| {100 * n / total:.1f} | `{frame[:140]}` |"
            for frame, n in inclusive[process].most_common(TOP)
        ]
        lines.append("")
    return "\n".join(lines)


def _process_name(frame: str) -> str:
    """'process 12:"python -m ... --service-name graft-inference ..."' -> 'graft-inference'."""
    words = frame.replace('"', " ").split()
    if "--service-name" in words:
        return words[words.index("--service-name") + 1]
    # Executables by name only: the summary is committed, the machine's paths are not.
    return " ".join(Path(word).name if "/" in word else word for word in words[:6])


def record(pid: int, seconds: float, fmt: str, out: Path) -> None:
    cmd = [
        py_spy(),
        "record",
        "--pid",
        str(pid),
        "--subprocesses",
        "--nonblocking",
        "--rate",
        "100",
        "--duration",
        str(int(seconds)),
        "--format",
        fmt,
        "-o",
        str(out),
    ]
    subprocess.run(cmd, check=True)
    # py-spy writes command lines (its own, each process's) into the output: keep the
    # machine's paths out of what is committed.
    text = out.read_text().replace(cmd[0], "py-spy").replace(f"{REPO_ROOT}/", "")
    out.write_text(text)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("--model", default="auto")
    parser.add_argument("--model-root", type=Path, default=REPO_ROOT / "models")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--duration", type=float, default=30.0, help="seconds profiled")
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        help="extra KEY=VALUE for graft serve, e.g. GRAFT_MAX_BATCH_SIZE=1",
    )
    args = parser.parse_args(argv)
    model = resolve_model(args.model_root.resolve(), args.model)
    env = dict(item.split("=", 1) for item in args.env)
    work = RESULTS_DIR / "profile"
    work.mkdir(parents=True, exist_ok=True)
    raw, svg = work / "profile.raw.txt", PLOTS_DIR / "profile-graft.svg"
    PLOTS_DIR.mkdir(parents=True, exist_ok=True)
    with graft(model, "profile", env) as server:
        load_s = args.warmup + 2 * args.duration + 10
        spec = {
            "target": {"kind": "graft-http", "url": server.url, "model": model.name},
            "images": {"dir": str(data_dir()), "count": QUICK.images},
            "runs": [
                {
                    "mode": "closed",
                    "concurrency": args.concurrency,
                    "warmup_s": 0.0,
                    "duration_s": load_s,
                }
            ],
        }
        spec_path = work / "loadgen.spec.json"
        spec_path.write_text(json.dumps(spec))
        loadgen = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.loadgen",
                str(spec_path),
                str(work / "loadgen.out.json"),
            ],
            cwd=REPO_ROOT,
        )
        time.sleep(args.warmup)
        record(server.process.pid, args.duration, "raw", raw)
        record(server.process.pid, args.duration, "flamegraph", svg)
        loadgen.terminate()  # it was sized to outlast both recordings
        loadgen.wait()
    summary = PLOTS_DIR / "profile-summary.md"
    summary.write_text(
        f"# py-spy profile of graft under {args.concurrency} concurrent clients\n\n"
        f"`python -m bench.profile {' '.join(argv)}`; model {model.name} v{model.version}; "
        f"{args.duration:.0f} s at 100 Hz; flame graph: [profile-graft.svg](profile-graft.svg)"
        f"\n\n{summarize(raw)}"
    )
    print(f"[bench.profile] wrote {summary} and {svg}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

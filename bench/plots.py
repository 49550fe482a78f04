"""The report's PNGs: throughput vs concurrency, latency percentiles, the version switch."""

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on a server
import matplotlib.pyplot as plt

from bench.config import SERVER_LABELS as LABELS
from bench.targets_check import Results, ceiling_of, closed


def _series(results: Results, name: str, key: str) -> tuple[list[int], list[float]]:
    runs = [r for r in results.get(name, {}).get("runs", []) if r["mode"] == "closed"]
    runs.sort(key=lambda r: r["concurrency"])
    values = [r["throughput_ips"] if key == "throughput" else r["latency_ms"][key] for r in runs]
    return [r["concurrency"] for r in runs], values


def throughput(results: Results, path: Path) -> Path | None:
    if not any(name in results for name in LABELS):
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, label in LABELS.items():
        x, y = _series(results, name, "throughput")
        if x:
            ax.plot(x, y, marker="o", label=label)
    for runtime, style in (("tensorflow", ":"), (None, "--")):
        best = ceiling_of(results, runtime)
        if best and (runtime or best["runtime"] != "tensorflow"):
            label = f"in-process ceiling, {best['runtime']}"
            ax.axhline(best["best_throughput_ips"], linestyle=style, color="grey", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent clients (closed loop)")
    ax.set_ylabel("images / s")
    ax.set_title("Throughput vs concurrency")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def latency(results: Results, path: Path) -> Path | None:
    if not any(name in results for name in LABELS):
        return None
    fig, axes = plt.subplots(1, 3, figsize=(12, 4), sharey=True)
    for ax, key in zip(axes, ("p50", "p95", "p99"), strict=True):
        for name, label in LABELS.items():
            x, y = _series(results, name, key)
            if x:
                ax.plot(x, y, marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{key} latency")
        ax.set_xlabel("concurrent clients")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("ms")
    axes[0].legend(fontsize=7)
    return _save(fig, path)


def latency_c16(results: Results, path: Path) -> Path | None:
    rows = [(label, closed(results, name, 16)) for name, label in LABELS.items()]
    rows = [(label, run) for label, run in rows if run]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.25
    for i, key in enumerate(("p50", "p95", "p99")):
        xs = [j + (i - 1) * width for j in range(len(rows))]
        ax.bar(xs, [run["latency_ms"][key] for _, run in rows], width, label=key)
    ax.set_xticks(range(len(rows)), [label for label, _ in rows], fontsize=8)
    ax.set_ylabel("ms")
    ax.set_title("Latency percentiles at 16 concurrent clients")
    ax.legend()
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)


def switch(results: Results, path: Path) -> Path | None:
    timeline: list[dict[str, Any]] = results.get("switch", {}).get("timeline") or []
    if not timeline:
        return None
    fig, ax = plt.subplots(figsize=(8, 4))
    t = [b["t"] for b in timeline]
    ax.plot(t, [b["p99_ms"] for b in timeline], label="p99 per second", marker=".")
    ax.plot(t, [b["p50_ms"] for b in timeline], label="p50 per second", marker=".")
    errors = [b["t"] for b in timeline if b["errors"]]
    if errors:
        ax.scatter(errors, [0] * len(errors), color="red", label="errors", zorder=3)
    ax.axvline(0, color="grey", linestyle="--", label="new version published")
    switched = [b["t"] for b in timeline if b["new_share"] >= 0.5]
    if switched:
        ax.axvline(switched[0], color="green", linestyle=":", label="most answers from new")
    ax.set_xlabel("seconds since publish")
    ax.set_ylabel("ms")
    ax.set_title("Version switch under 16 concurrent clients")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def draw_all(results: Results, folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    drawn = [
        throughput(results, folder / "throughput_vs_concurrency.png"),
        latency(results, folder / "latency_vs_concurrency.png"),
        latency_c16(results, folder / "latency_c16.png"),
        switch(results, folder / "version_switch.png"),
    ]
    return [p for p in drawn if p is not None]

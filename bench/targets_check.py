"""The performance targets of the benchmark issue, each judged met / missed from the results.

A target is never softened here: the threshold is the issue's, and a missed target must get a
cause and a plan in BENCHMARKS.md (the report warns when one is missing).
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Results = dict[str, dict[str, Any]]


@dataclass(frozen=True)
class Verdict:
    target_id: str
    target: str
    figure: str  # the measured figure(s), with units
    met: bool | None  # None: not measured (section missing or failed)
    contended: bool = False  # some figure behind it was measured under contention


def closed(results: Results, section: str, concurrency: int) -> dict[str, Any] | None:
    data = results.get(section)
    if not data or not data.get("ok"):
        return None
    for run in data.get("runs", []):
        # a run in which no request even started inside the window measured nothing
        if run["mode"] == "closed" and run["concurrency"] == concurrency and run["requests"]:
            return run
    return None


def _ceiling(results: Results) -> dict[str, Any] | None:
    data = results.get("ceiling")
    return data if data and data.get("ok") else None


def _missing(tid: str, target: str, what: str) -> Verdict:
    return Verdict(tid, target, f"not measured ({what})", None)


def t1_ceiling_ratio(results: Results) -> Verdict:
    target = "graft HTTP at concurrency 16 >= 0.85 x in-process ceiling throughput"
    run, ceiling = closed(results, "graft-http", 16), _ceiling(results)
    if not run or not ceiling:
        return _missing("T1", target, "graft-http c16 and ceiling")
    ratio = run["throughput_ips"] / ceiling["best_throughput_ips"]
    figure = (
        f"{run['throughput_ips']:.1f} / {ceiling['best_throughput_ips']:.1f} img/s = {ratio:.2f} x"
    )
    return Verdict(
        "T1",
        target,
        figure,
        ratio >= 0.85,
        run.get("contended", False) or ceiling.get("contended", False),
    )


def _versus(
    tid: str,
    target: str,
    ours: str,
    theirs: str,
    results: Results,
    min_ratio: float,
    need_lower_p99: bool,
    strict: bool = False,
) -> Verdict:
    a, b = closed(results, ours, 16), closed(results, theirs, 16)
    if not a or not b:
        return _missing(tid, target, f"{ours} c16 and {theirs} c16")
    ratio = a["throughput_ips"] / b["throughput_ips"] if b["throughput_ips"] else float("inf")
    p99a, p99b = a["latency_ms"]["p99"], b["latency_ms"]["p99"]
    met = (ratio > min_ratio if strict else ratio >= min_ratio) and (
        not need_lower_p99 or p99a < p99b
    )
    figure = f"{a['throughput_ips']:.1f} vs {b['throughput_ips']:.1f} img/s = {ratio:.2f} x" + (
        f"; p99 {p99a:.0f} vs {p99b:.0f} ms" if need_lower_p99 else ""
    )
    return Verdict(tid, target, figure, met, a.get("contended", False) or b.get("contended", False))


def t2_batching(results: Results) -> Verdict:
    return _versus(
        "T2",
        "batching on vs off at concurrency 16 >= 1.5 x throughput",
        "graft-http",
        "graft-nobatch",
        results,
        1.5,
        False,
    )


def t3_tutorial(results: Results) -> Verdict:
    return _versus(
        "T3",
        "vs tutorial app at concurrency 16: >= 1.5 x throughput, lower p99",
        "graft-http",
        "tutorial",
        results,
        1.5,
        True,
    )


def t4_kserve(results: Results) -> Verdict:
    return _versus(
        "T4",
        "vs KServe ModelServer at concurrency 16: higher throughput, lower p99",
        "graft-http",
        "kserve",
        results,
        1.0,
        True,
        strict=True,
    )


def t5_latency(results: Results) -> Verdict:
    target = "concurrency 1: p50 <= in-process batch-1 latency + 10 ms"
    run, ceiling = closed(results, "graft-http", 1), _ceiling(results)
    if not run or not ceiling or not ceiling.get("batch1_latency_ms"):
        return _missing("T5", target, "graft-http c1 and ceiling batch 1")
    p50, base = run["latency_ms"]["p50"], ceiling["batch1_latency_ms"]["p50"]
    figure = f"p50 {p50:.1f} ms vs {base:.1f} + 10 ms (overhead {p50 - base:+.1f} ms)"
    return Verdict(
        "T5",
        target,
        figure,
        p50 <= base + 10.0,
        run.get("contended", False) or ceiling.get("contended", False),
    )


def t6_grpc(results: Results) -> Verdict:
    return _versus(
        "T6",
        "gRPC >= HTTP throughput (concurrency 16)",
        "graft-grpc",
        "graft-http",
        results,
        1.0,
        False,
    )


def t7_switch(results: Results) -> Verdict:
    target = "version switch during concurrency 16: zero errors, p99 during <= 3 x steady"
    data = results.get("switch")
    if not data or not data.get("ok"):
        return _missing("T7", target, "switch")
    if not data["switched"]:
        return Verdict(
            "T7",
            target,
            "the new version never answered",
            False,
            data["run"].get("contended", False),
        )
    ratio = data["p99_ratio"]
    figure = (
        f"{data['errors']} errors; p99 {data['latency_ms_switch']['p99']:.0f} vs steady "
        f"{data['latency_ms_steady']['p99']:.0f} ms = {ratio:.2f} x; switched "
        f"{data['switch_delay_s']:.1f} s after publish"
    )
    return Verdict(
        "T7",
        target,
        figure,
        data["errors"] == 0 and ratio <= 3.0,
        data["run"].get("contended", False),
    )


def same_start(results: Results, a: str, b: str) -> bool:
    """Both sections measured on one server start (the pid and ready time it recorded)."""
    servers = [results.get(name, {}).get("server") or {} for name in (a, b)]
    starts = [(server.get("pid"), server.get("ready_at")) for server in servers]
    return None not in starts[0] and starts[0] == starts[1]


def t9_v2(results: Results) -> Verdict:
    target = (
        "V2 REST (binary tensor data) >= 0.95 x graft HTTP /classify throughput at "
        "concurrency 16, same server start"
    )
    if not same_start(results, "graft-v2", "graft-http"):
        if closed(results, "graft-v2", 16) and closed(results, "graft-http", 16):
            return _missing("T9", target, "graft-v2 and graft-http are from different starts")
        return _missing("T9", target, "graft-v2 c16 and graft-http c16")
    return _versus("T9", target, "graft-v2", "graft-http", results, 0.95, False)


# (id, target, path into bench/training_bench.py's figures, threshold, higher is better, unit)
TRAINING_TARGETS = (
    ("T8.1", "training: test accuracy >= 98 %", ("default", "accuracy"), 0.98, True, ""),
    ("T8.2", "training: macro-F1 >= 0.97", ("default", "macro_f1"), 0.97, True, ""),
    ("T8.3", "training: whole `graft train` <= 15 min", ("default", "wall_s"), 900.0, False, " s"),
    (
        "T8.4",
        "few-shot (--max-per-class 10): accuracy >= 85 %",
        ("few_shot_10", "accuracy"),
        0.85,
        True,
        "",
    ),
    (
        "T8.5",
        "phase-1 epoch with the feature cache >= 5 x faster",
        ("phase1_epoch_speedup",),
        5.0,
        True,
        " x",
    ),
)


def _dig(figures: dict[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        figures = figures.get(key) if isinstance(figures, dict) else None
    return figures


def t8_training(results: Results) -> list[Verdict]:
    """The training issue's targets, judged on bench/training_bench.py's figures."""
    data = results.get("training")
    rows = []
    for tid, target, path, threshold, higher, unit in TRAINING_TARGETS:
        value = _dig(data["figures"], path) if data and data.get("ok") else None
        if not isinstance(value, int | float):
            rows.append(_missing(tid, target, "training" if not data else ".".join(path)))
            continue
        met = value >= threshold if higher else value <= threshold
        rows.append(Verdict(tid, target, f"{value:g}{unit}", met))
    return rows


CHECKS: tuple[Callable[[Results], Verdict], ...] = (
    t1_ceiling_ratio,
    t2_batching,
    t3_tutorial,
    t4_kserve,
    t5_latency,
    t6_grpc,
    t7_switch,
)


def verdicts(results: Results) -> list[Verdict]:
    return [check(results) for check in CHECKS] + t8_training(results) + [t9_v2(results)]

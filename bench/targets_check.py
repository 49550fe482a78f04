"""The performance targets of the benchmark issue, each judged met / missed from the results.

A target is never softened here: the threshold is the issue's, and a missed target must get a
cause and a plan in BENCHMARKS.md (the report warns when one is missing).
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench.config import PEERS

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


def ceiling_of(results: Results, runtime: str | None) -> dict[str, Any] | None:
    """One runtime's in-process figures (best row, batch-1 latency); `runtime` None = the
    fastest measured. A ceiling from before runtimes were measured is TensorFlow's."""
    data = _ceiling(results)
    if not data:
        return None
    runtimes = data.get("runtimes") or {"tensorflow": data}
    if runtime is None:
        runtime = max(runtimes, key=lambda name: runtimes[name]["best_throughput_ips"])
    figures = runtimes.get(runtime)
    return {"runtime": runtime, **figures} if figures else None


def served_runtime(results: Results, section: str = "graft-http") -> str | None:
    """The runtime a server ran the network on (graft's is read from its /metrics)."""
    return ((results.get(section) or {}).get("server") or {}).get("runtime")


def _missing(tid: str, target: str, what: str) -> Verdict:
    return Verdict(tid, target, f"not measured ({what})", None)


def _vs_ceiling(
    tid: str, target: str, results: Results, runtime: str | None, least: float
) -> Verdict:
    run, ceiling = closed(results, "graft-http", 16), ceiling_of(results, runtime)
    if not run or not ceiling:
        return _missing(tid, target, f"graft-http c16 and the {runtime or 'fastest'} ceiling")
    best = ceiling["best_throughput_ips"]
    ratio = run["throughput_ips"] / best
    figure = (
        f"{run['throughput_ips']:.1f} / {best:.1f} img/s ({ceiling['runtime']}, batch "
        f"{ceiling['best_batch_size']} x {ceiling.get('best_callers', 1)}) = {ratio:.2f} x"
    )
    contended = run.get("contended", False) or ceiling.get("contended", False)
    return Verdict(tid, target, figure, ratio >= least, contended)


def t1_ceiling_ratio(results: Results) -> Verdict:
    target = (
        "graft HTTP at concurrency 16 >= 0.85 x the in-process ceiling of the fastest runtime "
        "(decode + network, best batch x callers)"
    )
    return _vs_ceiling("T1", target, results, None, 0.85)


def t10_tensorflow_ceiling(results: Results) -> Verdict:
    target = (
        "graft HTTP at concurrency 16 >= 1.5 x the TensorFlow in-process ceiling "
        "(serving_default, best batch x callers)"
    )
    return _vs_ceiling("T10", target, results, "tensorflow", 1.5)


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
    target = "concurrency 1: p50 <= the same runtime's in-process batch-1 latency + 5 ms"
    run, runtime = closed(results, "graft-http", 1), served_runtime(results)
    ceiling = ceiling_of(results, runtime) if runtime else None
    if not run or not ceiling or not ceiling.get("batch1_latency_ms"):
        what = f"the {runtime} ceiling's batch 1" if runtime else "graft's runtime"
        return _missing("T5", target, f"graft-http c1 and {what}")
    p50, base = run["latency_ms"]["p50"], ceiling["batch1_latency_ms"]["p50"]
    figure = f"p50 {p50:.1f} ms vs {runtime} {base:.1f} + 5 ms (overhead {p50 - base:+.1f} ms)"
    return Verdict(
        "T5",
        target,
        figure,
        p50 <= base + 5.0,
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


PEER_LEVELS = (1, 4, 16, 64)  # the client counts at which graft must lead every peer


def _beats_peers(
    tid: str,
    target: str,
    results: Results,
    levels: tuple[int, ...],
    figure_of: Callable[[dict[str, Any]], float],
    higher_wins: bool,
    unit: str,
) -> Verdict:
    """graft HTTP against every peer at each level: missed if it loses any measured pair,
    not measured if it wins all of them but some pair is missing."""
    parts, missing, won, contended = [], [], True, False
    for level in levels:
        ours = closed(results, "graft-http", level)
        if not ours:
            missing.append(f"graft-http c{level}")
            continue
        cells = []
        for peer in PEERS:
            theirs = closed(results, peer, level)
            if not theirs:
                missing.append(f"{peer} c{level}")
                continue
            a, b = figure_of(ours), figure_of(theirs)
            won = won and (a > b if higher_wins else a < b)
            contended = contended or bool(ours.get("contended") or theirs.get("contended"))
            cells.append(f"{peer} {b:.1f}")
        if cells:
            parts.append(f"c={level}: {figure_of(ours):.1f} vs {', '.join(cells)} {unit}")
    figure = "; ".join(parts) or "nothing to compare"
    if missing:
        figure += f"; not measured: {', '.join(missing)}"
    return Verdict(tid, target, figure, won if (not missing or not won) else None, contended)


def t11_ahead_of_peers(results: Results) -> Verdict:
    return _beats_peers(
        "T11",
        "graft HTTP throughput ahead of every peer (tutorial TF, tutorial ONNX, KServe) at "
        "1, 4, 16 and 64 clients",
        results,
        PEER_LEVELS,
        lambda run: run["throughput_ips"],
        True,
        "img/s",
    )


def t12_p99(results: Results) -> Verdict:
    return _beats_peers(
        "T12",
        "graft HTTP p99 at 16 clients lower than every peer's",
        results,
        (16,),
        lambda run: run["latency_ms"]["p99"],
        False,
        "ms",
    )


def _pss_under_load(results: Results, section: str) -> float | None:
    data = results.get(section) or {}
    pss = ((data.get("server") or {}).get("memory_under_load") or {}).get("pss_mib")
    return pss if data.get("ok") and isinstance(pss, int | float) and pss == pss else None


def t13_memory(results: Results) -> Verdict:
    target = (
        "memory: graft's PSS serving one model, under load, <= 1.2 x the tutorial app's on "
        "the same runtime"
    )
    runtime = served_runtime(results)
    if runtime is None:
        return _missing("T13", target, "graft-http and its runtime")
    peer = "tutorial" if runtime == "tensorflow" else "tutorial-onnx"
    ours, theirs = _pss_under_load(results, "graft-http"), _pss_under_load(results, peer)
    if ours is None or theirs is None:
        return _missing("T13", target, f"graft-http and {peer} PSS under load")
    ratio = ours / theirs
    figure = f"{ours:.0f} vs {peer} {theirs:.0f} MiB = {ratio:.2f} x ({runtime})"
    return Verdict("T13", target, figure, ratio <= 1.2)


# (id, target, path into bench/training_bench.py's figures, threshold, higher is better, unit)
TRAINING_TARGETS = (
    ("T8.1", "training: test accuracy >= 98 %", ("default", "accuracy"), 0.98, True, ""),
    ("T8.2", "training: macro-F1 >= 0.97", ("default", "macro_f1"), 0.97, True, ""),
    ("T8.3", "training: whole `graft train` <= 15 min", ("default", "wall_s"), 900.0, False, " s"),
    ("T8.6", "training: default `graft train` <= 200 s", ("default", "wall_s"), 200.0, False, " s"),
    ("T8.7", "training: test ECE, calibrated, <= 0.02", ("default", "ece_after"), 0.02, False, ""),
    ("T8.8", "OOD: non-leaf images flagged >= 95 %", ("ood", "non_leaf_flagged"), 0.95, True, ""),
    ("T8.9", "OOD: test leaves flagged <= 2 %", ("ood", "test_leaves_flagged"), 0.02, False, ""),
    ("T8.10", "OOD fit: <= 10 % of `graft train`", ("default", "ood_share"), 0.10, False, ""),
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
# Issue 15's (the accelerated runtime); T1 and T5 above are its versions of the older two.
LATER_CHECKS: tuple[Callable[[Results], Verdict], ...] = (
    t9_v2,
    t10_tensorflow_ceiling,
    t11_ahead_of_peers,
    t12_p99,
    t13_memory,
)


def verdicts(results: Results) -> list[Verdict]:
    return (
        [check(results) for check in CHECKS]
        + t8_training(results)
        + [check(results) for check in LATER_CHECKS]
    )

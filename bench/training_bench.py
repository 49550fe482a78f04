"""Training figures for BENCHMARKS.md: `run(quick) -> dict` (called by `python -m bench`).

Full run, on the benchmark dataset (GRAFT_BENCH_DATA, default plantvillage-apple):
  1. `graft train` with default settings: wall and CPU seconds, seconds per phase, phase-1
     cached epoch seconds, test accuracy, macro-F1, and the runtime that ran the frozen
     backbone for the feature cache (GRAFT_RUNTIME / --runtime; auto = ONNX Runtime);
  2. `graft train --max-per-class 10` (few-shot): the same figures;
  3. one phase-1 epoch WITHOUT the feature cache, on the same split and settings as run 1,
     for the cached-vs-uncached epoch speed-up.
Quick run: only 2 and 3 (3 on the few-shot split), a few minutes.

Standalone: `python -m bench.training_bench [--quick]` prints the JSON.
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.images import REPO_ROOT, data_dir, shown

GRAFT = str(Path(sys.executable).parent / "graft")


def _cpu_seconds_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def train(data: Path, work: Path, name: str, extra: list[str]) -> dict[str, Any]:
    """One `graft train` subprocess; its JSON line plus wall and CPU seconds."""
    command = [GRAFT, "train", str(data), "--name", name, "--model-root", str(work / "models")]
    command += ["--report-dir", str(work / name), "--quiet", *extra]
    cpu, start = _cpu_seconds_children(), time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False, cwd=REPO_ROOT)
    wall, cpu = time.perf_counter() - start, _cpu_seconds_children() - cpu
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "wall_s": wall, "cpu_s": cpu}


def summarise(result: dict[str, Any]) -> dict[str, Any]:
    timings = result["timings"]
    phase1, phase2 = timings["phase1"], timings.get("phase2") or {}
    cached_epochs = phase1["epoch_seconds"]
    return {
        "feature_runtime": timings.get("feature_runtime"),
        "accuracy": result["metrics"]["accuracy"],
        "macro_f1": result["metrics"]["macro_f1"],
        "temperature": result["metrics"]["calibration"].get("temperature"),
        "ece_before": result["metrics"]["calibration"].get("ece_before"),
        "ece_after": result["metrics"]["calibration"].get("ece_after"),
        "calibrate_s": round(timings.get("calibrate", 0.0), 1),
        "test_images": result["metrics"]["test_images"],
        "train_images": result["metrics"]["train_images"],
        "wall_s": round(result["wall_s"], 1),
        "cpu_s": round(result["cpu_s"], 1),
        "scan_s": round(timings["scan"], 1),
        "cache_extract_s": round(phase1["extract_seconds"], 1),
        "phase1_s": round(phase1["seconds"], 1),
        "phase1_epochs": len(cached_epochs),
        "phase1_cached_epoch_s": round(statistics.median(cached_epochs), 4),
        "phase2_s": round(phase2.get("seconds", 0.0), 1),
        "phase2_epochs": len(phase2.get("epoch_seconds", [])),
        "evaluate_s": round(timings["evaluate"], 1),
        "export_publish_s": round(timings["export"], 1),
    }


def uncached_phase1_epoch(data: Path, max_per_class: int | None) -> float:
    """Seconds of one phase-1 epoch on pixels (frozen backbone run every step), with the
    defaults of `graft train` (backbone, image size, batch size, augmentation, split)."""
    from training import commands_train as defaults
    from training.augment import AugmentConfig, build_augmenter
    from training.backbones import get_backbone
    from training.fit import train_pixels
    from training.fit_config import FitConfig
    from training.model import build_classifier
    from training.progress import Reporter
    from training.scan import scan
    from training.split import split

    with tempfile.TemporaryDirectory() as work:
        dataset = scan(data, Path(work))
    parts = split(dataset, seed=0, max_per_class=max_per_class)
    spec = get_backbone(defaults.DEFAULT_BACKBONE)
    size = defaults.DEFAULT_IMAGE_SIZE
    classifier = build_classifier(
        spec.build(image_size=size),
        len(dataset.classes),
        image_size=size,
        backbone=spec.name,
        hidden_units=defaults.DEFAULT_HIDDEN_UNITS,
    )
    config = FitConfig(batch_size=defaults.DEFAULT_BATCH_SIZE)
    result = train_pixels(
        classifier, parts.train, parts.val, config, build_augmenter(AugmentConfig(), 0),
        Reporter(quiet=True), phase=1, epochs=1, learning_rate=config.learning_rate,
    )  # fmt: skip
    return result.epoch_seconds[0]


def run(quick: bool) -> dict[str, Any]:
    data = data_dir()
    if not data.is_dir():
        raise FileNotFoundError(f"training benchmark data not found at {data} (GRAFT_BENCH_DATA)")
    figures: dict[str, Any] = {"dataset": shown(data), "quick": quick}
    with tempfile.TemporaryDirectory(prefix="graft-train-bench-") as tmp:
        work = Path(tmp)
        if not quick:
            figures["default"] = summarise(train(data, work, "bench-default", []))
        few = train(data, work, "bench-fewshot", ["--max-per-class", "10"])
        figures["few_shot_10"] = summarise(few)
    reference = figures["few_shot_10" if quick else "default"]
    uncached = uncached_phase1_epoch(data, 10 if quick else None)
    figures["phase1_uncached_epoch_s"] = round(uncached, 2)
    figures["phase1_epoch_speedup"] = round(uncached / reference["phase1_cached_epoch_s"], 1)
    # What the whole of phase 1 would have cost on pixels vs what it cost with the cache, the
    # one-off backbone passes included (they also feed phase 2): the amortised figure.
    pixels_phase1 = uncached * reference["phase1_epochs"]
    cached_phase1 = reference["cache_extract_s"] + reference["phase1_s"]
    figures["phase1_total_speedup"] = round(pixels_phase1 / cached_phase1, 2)
    return figures


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv[1:]), indent=2))

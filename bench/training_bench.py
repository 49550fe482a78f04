"""Training figures for BENCHMARKS.md: `run(quick) -> dict` (called by `python -m bench`).

Full run, on the benchmark dataset (GRAFT_BENCH_DATA, default plantvillage-apple):
  1. `graft train` with default settings: wall and CPU seconds, seconds per phase, phase-1
     cached epoch seconds, test accuracy, macro-F1, and the runtime that ran the frozen
     backbone for the feature cache (GRAFT_RUNTIME / --runtime; auto = ONNX Runtime);
  2. `graft train --max-per-class 10` (few-shot): the same figures;
  3. one phase-1 epoch WITHOUT the feature cache, on the same split and settings as run 1,
     for the cached-vs-uncached epoch speed-up;
  4. the out-of-distribution flag of run 1's export (`ood`): the share of non-leaf images
     (bench/ood_images.py: scikit-image's photographs, crops and flips, synthetic textures)
     and of the test split's leaves that its serving_default flags. Each run's figures also
     hold the ECE before and after calibration and the seconds of the OOD fit.
Quick run: only 2, 3 and 4 (3 on the few-shot split, 4 on its export), a few minutes.

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
        "ood_method": result["metrics"].get("ood", {}).get("method"),
        "ood_validation_flagged": result["metrics"].get("ood", {}).get("validation_flagged_rate"),
        "ood_test_flagged": result["metrics"].get("ood", {}).get("test_flagged_rate"),
        "ood_threshold": result["metrics"].get("ood", {}).get("threshold"),
        # how many scores (validation images and their augmented views) it came from
        "ood_calibration_count": result["metrics"].get("ood", {}).get("calibration_count"),
        "ood_s": round(timings.get("ood", 0.0), 1),
        # the OOD fit's extra time, as a share of the whole run
        "ood_share": round(timings.get("ood", 0.0) / result["wall_s"], 4),
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


def _flagged(serve: Any, images: list[bytes], batch: int = 32) -> list[bool]:
    """serving_default's `in_distribution` negated, image by image, in batches."""
    import tensorflow as tf

    flags: list[bool] = []
    for start in range(0, len(images), batch):
        outputs = serve(images=tf.constant(images[start : start + batch]))
        flags.extend((~outputs["in_distribution"].numpy()).tolist())
    return flags


def ood_detection(version_dir: Path, report_dir: Path) -> dict[str, Any]:
    """The share of non-leaf images (bench/ood_images.py) and of the run's test leaves (its
    report's split.json) that the published version flags, through its own serving_default."""
    import tensorflow as tf

    from bench.ood_images import kind, ood_images

    serve = tf.saved_model.load(str(version_dir)).signatures["serving_default"]
    if "in_distribution" not in serve.structured_outputs:
        return {"skipped": "the version has no out-of-distribution outputs"}
    others = ood_images()
    flags = _flagged(serve, [data for _, data in others])
    split = json.loads((report_dir / "split.json").read_text())
    test = [(Path(split["root"]) / row["path"]).read_bytes() for row in split["test"]]
    test_flags = _flagged(serve, test)
    names = [name for name, _ in others]
    by_kind: dict[str, list[bool]] = {}
    for name, flag in zip(names, flags, strict=True):
        by_kind.setdefault(kind(name), []).append(flag)
    return {
        "non_leaf_images": len(others),
        "non_leaf_flagged": _share(flags),
        **{f"{k}_flagged": _share(v) for k, v in sorted(by_kind.items())},
        "missed": [name for name, flag in zip(names, flags, strict=True) if not flag][:20],
        "test_leaves": len(test),
        "test_leaves_flagged": _share(test_flags),
    }


def _share(flags: list[bool]) -> float | None:
    return round(statistics.mean(flags), 4) if flags else None


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
        default = None if quick else train(data, work, "bench-default", [])
        if default is not None:
            figures["default"] = summarise(default)
        few = train(data, work, "bench-fewshot", ["--max-per-class", "10"])
        figures["few_shot_10"] = summarise(few)
        judged = default or few
        figures["ood"] = ood_detection(Path(judged["path"]), Path(judged["report_dir"]))
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

"""The evaluation report folder (JSON + PNG) and the short table printed on the terminal."""

from __future__ import annotations

import json
import math
from pathlib import Path

from rich.console import Console
from rich.table import Table


def _save_json(path: Path, value: object) -> Path:
    path.write_text(json.dumps(value, indent=2))
    return path


def _pyplot():  # matplotlib.pyplot: a module, untyped
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(matrix: list[list[int]], labels: list[str], path: Path) -> Path:
    """Heat map, rows = true class, columns = predicted, every cell annotated with its count."""
    plt = _pyplot()
    size = max(4.0, 0.7 * len(labels) + 2.5)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(image, ax=ax, fraction=0.046)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    peak = max((max(row) for row in matrix), default=0)
    for t, row in enumerate(matrix):
        for p, count in enumerate(row):
            colour = "white" if count > peak / 2 else "black"
            ax.text(p, t, str(count), ha="center", va="center", color=colour, fontsize=8)
    ax.set_title("confusion matrix")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_curves(phases: dict[str, dict[str, list[float]]], path: Path) -> Path:
    """Loss and accuracy per epoch, train and validation, phases one after the other."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    offset = 0
    for phase, history in phases.items():
        epochs = len(history.get("loss", []))
        xs = list(range(offset + 1, offset + epochs + 1))
        for ax, metric in zip(axes, ("loss", "accuracy"), strict=True):
            for prefix, style in (("", "-"), ("val_", "--")):
                if history.get(prefix + metric):
                    ax.plot(
                        xs,
                        history[prefix + metric],
                        style,
                        label=f"{phase} {prefix or 'train_'}{metric}",
                    )
        offset += epochs
    for ax, metric in zip(axes, ("loss", "accuracy"), strict=True):
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_reliability(
    bins: dict[str, list[dict[str, float]]],
    path: Path,
    title: str = "reliability on the test split",
) -> Path:
    """Accuracy against confidence per bin, one line per set of scores (before and after
    calibration); the diagonal is a perfectly calibrated model."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", label="calibrated")
    for name, rows in bins.items():
        ax.plot(
            [r["confidence"] for r in rows], [r["accuracy"] for r in rows], marker="o", label=name
        )
    ax.set_xlabel("confidence (top-1 score)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.legend(loc="upper left")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_ood_scores(
    scores: dict[str, list[float]], threshold: float, path: Path, method: str = ""
) -> Path:
    """Histograms of the out-of-distribution scores, one per split, and the threshold above
    which an image is flagged."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    finite = [v for values in scores.values() for v in values if math.isfinite(v)]
    edges = _bin_edges([*finite, threshold])
    for name, values in scores.items():
        ax.hist([v for v in values if math.isfinite(v)], bins=edges, alpha=0.55, label=name)
    ax.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:.4g}")
    ax.set_xlabel(f"OOD score{f' ({method})' if method else ''}: higher = further from training")
    ax.set_ylabel("images")
    ax.legend(fontsize=8)
    ax.set_title("out-of-distribution scores")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _bin_edges(values: list[float], bins: int = 40) -> list[float]:
    low, high = min(values), max(values)
    if high <= low:
        low, high = low - 0.5, high + 0.5
    return [low + (high - low) * i / bins for i in range(bins + 1)]


def write_report(
    report_dir: Path,
    metrics: dict,
    histories: dict[str, dict[str, list[float]]] | None = None,
    reliability: dict[str, list[dict[str, float]]] | None = None,
) -> dict[str, str]:
    """metrics.json, confusion_matrix.json/.png and (after training) curves.png and the
    reliability diagram."""
    report_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "metrics": _save_json(report_dir / "metrics.json", metrics),
        "confusion_matrix": _save_json(
            report_dir / "confusion_matrix.json",
            {"labels": metrics["labels"], "matrix": metrics["confusion_matrix"]},
        ),
        "confusion_matrix_png": plot_confusion(
            metrics["confusion_matrix"], metrics["labels"], report_dir / "confusion_matrix.png"
        ),
    }
    if histories:
        files["curves_png"] = plot_curves(histories, report_dir / "curves.png")
    if reliability:
        files["reliability_png"] = plot_reliability(reliability, report_dir / "reliability.png")
    return {name: str(path) for name, path in files.items()}


def print_summary(console: Console, metrics: dict, title: str) -> None:
    table = Table(title=title, title_justify="left")
    for column in ("class", "precision", "recall", "f1", "support"):
        table.add_column(column, justify="left" if column == "class" else "right")
    for label, score in metrics["per_class"].items():
        table.add_row(
            label,
            f"{score['precision']:.3f}",
            f"{score['recall']:.3f}",
            f"{score['f1']:.3f}",
            str(score["support"]),
        )
    console.print(table)
    top_k = "  ".join(f"top-{k} {v:.4f}" for k, v in metrics["top_k_accuracy"].items() if k != "1")
    console.print(
        f"accuracy {metrics['accuracy']:.4f}  macro-F1 {metrics['macro_f1']:.4f}  {top_k}"
        f"  ({metrics['count']} images)",
        highlight=False,
    )
    for pair in metrics["most_confused"][:3]:
        console.print(
            f"  confused: {pair['true']} -> {pair['predicted']} x{pair['count']}", highlight=False
        )

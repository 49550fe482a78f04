"""The settings of a two-phase fit, shared by the phase runners and the feature cache."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from training.defaults import DEFAULT_RUNTIME


@dataclass
class FitConfig:
    epochs: int = 15
    fine_tune_epochs: int = 3
    fine_tune_layers: int = 20
    batch_size: int = 32
    learning_rate: float = 1e-3
    fine_tune_learning_rate: float = 1e-4
    patience: int = 3
    class_weighting: bool = True
    cache_features: bool = True
    views: int = 2  # cached views per training image: the image itself + (views-1) augmented
    # Cached epochs over several views are at least this many steps: a few-shot set of 40
    # images is 2 batches, and 15 epochs of 2 steps would leave the head untrained.
    min_cached_steps: int = 20
    seed: int = 0
    checkpoint_dir: Path | None = None
    # What runs the frozen part for the feature cache: auto | onnxruntime | openvino |
    # tensorflow, as GRAFT_RUNTIME (training.feature_cache).
    runtime: str = DEFAULT_RUNTIME

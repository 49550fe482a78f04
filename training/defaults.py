"""Defaults wanted both where Keras is loaded (the backbone registry, the ImageNet default
model) and where it must not be (`graft --help` builds the commands' options from these)."""

DEFAULT_BACKBONE = "efficientnet_lite0"

"""Defaults wanted both where Keras is loaded (the backbone registry, the ImageNet default
model) and where it must not be (`graft --help` builds the commands' options from these)."""

DEFAULT_BACKBONE = "efficientnet_lite0"

# What runs the frozen backbone's passes (the feature cache), as GRAFT_RUNTIME means it for
# serving: auto = ONNX Runtime when installed, else TensorFlow.
DEFAULT_RUNTIME = "auto"

"""Defaults wanted both where Keras is loaded (the backbone registry, the ImageNet default
model) and where it must not be (`graft --help` builds the commands' options from these)."""

DEFAULT_BACKBONE = "efficientnet_lite0"

# What runs the frozen backbone's passes (the feature cache), as GRAFT_RUNTIME means it for
# serving: auto = ONNX Runtime when installed, else TensorFlow.
DEFAULT_RUNTIME = "auto"

# Training batch size: 32 on a CPU; a GPU is fed larger batches (its cost per batch hardly grows).
DEFAULT_BATCH_SIZE = 32
GPU_BATCH_SIZE = 64


def default_batch_size() -> int:
    """The batch size for the device training will run on (a visible NVIDIA GPU, else CPU)."""
    from service.runtime.devices import GPU, resolve_device

    return GPU_BATCH_SIZE if resolve_device("auto").kind == GPU else DEFAULT_BATCH_SIZE

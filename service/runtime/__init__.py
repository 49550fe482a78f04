"""The inference side, all TensorFlow: loaded models, version manager, batcher, model check."""

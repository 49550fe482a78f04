"""The model repository (TF Serving layout), its manifests and durable writes; no TensorFlow."""

"""Accepting a model upload: safe archive extraction, checks, publish; no TensorFlow."""

"""Shared fixtures. Tests never need ../shared: images are generated or come from skimage."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

"""The servers graft is compared with, each serving the same SavedModel."""

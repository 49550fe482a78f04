"""Stubs for graft.v1 (proto/graft/v1/*.proto)."""

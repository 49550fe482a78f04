"""Stubs for the graft.* proto packages."""

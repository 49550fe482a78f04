"""Helpers shared by the test modules (real exports, real encoded images)."""

"""Byte units for sizes and limits."""

MiB = 1024 * 1024

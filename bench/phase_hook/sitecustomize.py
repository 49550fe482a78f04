"""Loaded by every Python process started with this folder on PYTHONPATH (`python -m
bench.phases` does that for the graft server it starts): times the phases of each request in
the serving process. Does nothing unless GRAFT_BENCH_PHASES_DIR is set."""

import os

if os.environ.get("GRAFT_BENCH_PHASES_DIR"):
    from bench.phases import install

    install()

"""pytest helpers for latency regression tests (see bench.py)."""

"""Benchmarks: `python -m edkm bench NAME` (or `edkm bench NAME`)."""

"""Benchmarks: scripts that print the figures in BENCHMARKS.md (``make bench``)."""

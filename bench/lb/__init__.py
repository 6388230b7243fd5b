"""Benchmark: one backend change to updated KV lb entries."""

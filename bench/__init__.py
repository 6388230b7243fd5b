"""Benchmarks, each measured side by side with its peer; results in docs/BENCHMARKS.md."""

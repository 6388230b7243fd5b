"""Maglev table build benchmark: ``python -m bench.maglev [--write]``."""

"""Datapath benchmark: ``python -m bench.datapath [--write] [--quick]``."""

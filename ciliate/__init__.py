"""Ciliate's shared kernel: resources, bus, store, API base, runner and the `ciliate` CLI."""

__version__ = "0.1.0"

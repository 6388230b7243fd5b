"""Pure load-balancing algorithms (no I/O)."""

"""The events service's pure core: rings, filters, queries, metrics, fan-out, export rules."""

"""The identity service's pure logic: id pools, reference counts, IPAM and KV payloads (no I/O)."""

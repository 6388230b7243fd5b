"""The datapath's pure core: KV payloads to map writes, conntrack GC, event decoding (no I/O)."""

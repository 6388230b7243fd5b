"""Pure policy engine: normalized rules, compile to policy-map entries, BPF-equivalent lookup."""

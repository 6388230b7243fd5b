"""Per-node datapath agent: pod sandboxes, tc BPF policy enforcement, conntrack, flow events."""

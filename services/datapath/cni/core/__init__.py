"""Pure CNI pieces: the spec's invocation and result documents, host-local address allocation."""

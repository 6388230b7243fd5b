"""Pure half of the datapath LB: KV `lb` -> map contents, and the ordered diff between them."""

"""The policy service: NetworkPolicy / CiliumNetworkPolicy compiled into policy-map entries."""

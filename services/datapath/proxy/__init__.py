"""Per-node transparent L7 proxies (HTTP, DNS) and the redirect that feeds them."""

"""What a dev-mode pod serves, from its container images: pods have no real images here, so
the pod server plays the few whose behaviour a demo needs and is agnhost-like otherwise."""

from __future__ import annotations

from collections.abc import Sequence

# Images whose behaviour the dev-mode pod server plays (by repository, any registry or tag);
# any other image gets the agnhost-like name-then-echo server.
SIMULATED_IMAGES: dict[str, str] = {"cilium/starwars": "http-demo"}


def image_repository(image: str) -> str:
    """``docker.io/cilium/starwars:v1`` -> ``cilium/starwars`` (registry, tag, digest dropped)."""
    name = image.split("@", 1)[0]
    first, _, rest = name.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        name = rest
    repo, _, tag = name.rpartition(":")
    if repo and "/" not in tag:
        name = repo
    return name


def http_demo_ports(images: Sequence[str], tcp_ports: Sequence[int]) -> list[int]:
    """The TCP ports on which the pod server plays the Star Wars deathstar."""
    if any(SIMULATED_IMAGES.get(image_repository(i)) == "http-demo" for i in images):
        return list(tcp_ports)
    return []

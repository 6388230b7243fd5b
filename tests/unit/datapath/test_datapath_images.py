"""Which dev-mode pods play the Star Wars deathstar, from their images."""

from __future__ import annotations

import pytest

from services.datapath.core.images import http_demo_ports, image_repository


@pytest.mark.parametrize(("image", "repo"), [
    ("docker.io/cilium/starwars", "cilium/starwars"),
    ("cilium/starwars:v1.0", "cilium/starwars"),
    ("quay.io/cilium/starwars@sha256:abcd", "cilium/starwars"),
    ("localhost:5000/cilium/starwars:latest", "cilium/starwars"),
    ("registry.k8s.io/e2e-test-images/agnhost:2.39", "e2e-test-images/agnhost"),
    ("busybox", "busybox"),
])
def test_image_repository_drops_registry_tag_and_digest(image: str, repo: str) -> None:
    assert image_repository(image) == repo


def test_only_the_starwars_image_serves_the_demo() -> None:
    assert http_demo_ports(["docker.io/cilium/starwars"], [80, 8080]) == [80, 8080]
    assert http_demo_ports(["docker.io/tgraf/netperf"], [80]) == []
    assert http_demo_ports([], [80]) == []

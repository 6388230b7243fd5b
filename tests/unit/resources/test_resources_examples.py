"""Every shared example and conformance file loads into typed resources users depend on."""

from __future__ import annotations

from pathlib import Path

import pytest

from ciliate.resources import (
    KINDS,
    Namespace,
    Pod,
    Service,
    TracingPolicy,
    load_resources,
    owner_of,
)

SHARED = Path(__file__).resolve().parents[3].parent / "shared"
EXAMPLES = sorted((SHARED / "examples").glob("*.yaml"))
CONFORMANCE = sorted((SHARED / "conformance" / "netpol").glob("**/*.yaml"))

needs_shared = pytest.mark.skipif(
    not SHARED.is_dir(), reason=f"shared material not found at {SHARED}"
)


@needs_shared
@pytest.mark.parametrize("path", EXAMPLES + CONFORMANCE, ids=lambda p: p.name)
def test_shared_file_parses(path: Path) -> None:
    resources = load_resources(path.read_bytes())
    assert resources, f"{path} yielded no resources"
    for resource in resources:
        assert type(resource) is KINDS[resource.kind]
        assert resource.metadata.name


@needs_shared
def test_conformance_world_shape() -> None:
    resources = load_resources((SHARED / "conformance/netpol/world.yaml").read_bytes())
    namespaces = [r for r in resources if isinstance(r, Namespace)]
    pods = [r for r in resources if isinstance(r, Pod)]
    assert sorted(n.metadata.name for n in namespaces) == ["x", "y", "z"]
    assert len(pods) == 9
    for pod in pods:
        assert pod.ready
        assert len(pod.ips) == 1 and pod.ips[0].startswith("10.244.")
        port = pod.named_port("serve-81-udp")
        assert port is not None and (port.containerPort, port.protocol) == (81, "UDP")
        assert pod.named_port("serve-81-udp", "TCP") is None


@needs_shared
def test_starwars_service_and_owners() -> None:
    resources = load_resources((SHARED / "examples/starwars.yaml").read_bytes())
    (service,) = [r for r in resources if isinstance(r, Service)]
    assert service.spec.selector == {"org": "empire", "class": "deathstar"}
    assert service.spec.ports[0].target == 80
    assert service.lb_algorithm is None
    assert {owner_of(r.kind) for r in resources} == {"identity", "lb", "policy"}
    # Unknown fields a user wrote (container image, L7 rules) survive a round trip.
    pod = next(r for r in resources if isinstance(r, Pod))
    dumped = pod.model_dump(by_alias=True, exclude_unset=True)
    assert dumped["spec"]["containers"][0]["image"] == "docker.io/cilium/starwars"


@needs_shared
def test_tracingpolicy_examples() -> None:
    (kill,) = load_resources((SHARED / "examples/tracingpolicy-kill-tmp-exec.yaml").read_bytes())
    assert isinstance(kill, TracingPolicy)
    ((group, hook),) = kill.spec.hooks
    assert group == "tracepoints"
    selector = hook.selectors[0]
    assert selector.matchArgs[0].operator == "Prefix"
    assert selector.matchArgs[0].values == ["/tmp/"]
    assert selector.matchActions[0].action == "Sigkill"
    (fd,) = load_resources((SHARED / "examples/tracingpolicy-fd-install.yaml").read_bytes())
    assert isinstance(fd, TracingPolicy)
    assert [g for g, _ in fd.spec.hooks] == ["kprobes"]


def test_every_kind_has_owner_and_api_version() -> None:
    expected = {
        "Namespace": "identity",
        "Pod": "identity",
        "Service": "lb",
        "EndpointSlice": "lb",
        "NetworkPolicy": "policy",
        "CiliumNetworkPolicy": "policy",
        "CiliumClusterwideNetworkPolicy": "policy",
        "TracingPolicy": "security",
        "TracingPolicyNamespaced": "security",
    }
    assert {kind: owner_of(kind) for kind in KINDS} == expected
    assert all(cls.API_VERSIONS for cls in KINDS.values())

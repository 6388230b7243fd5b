"""Offline evaluation: a world of namespaces and pods, identities derived as Cilium does,
and the reachability matrix / trace computed by compiling and looking up the policy map."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from ciliate.labels import CIDR_IDENTITY_BASE, CLUSTER_IDENTITY_MIN, RESERVED, LabelSet
from ciliate.labels.k8s import endpoint_labels
from ciliate.resources.base import Resource
from ciliate.resources.ciliumpolicy import CiliumClusterwideNetworkPolicy, CiliumNetworkPolicy
from ciliate.resources.core import Namespace, Pod
from ciliate.resources.networkpolicy import NetworkPolicy
from services.policy.core.compile import (
    CompileResult,
    IdentityWorld,
    LookupResult,
    PolicyEngine,
    lookup,
)
from services.policy.core.spec import PROTOCOL_NUMBERS, Direction, PolicySet, normalize

PolicyResource = NetworkPolicy | CiliumNetworkPolicy | CiliumClusterwideNetworkPolicy


@dataclass(frozen=True)
class WorldPod:
    namespace: str
    name: str
    labels: LabelSet
    identity: int
    named_ports: Mapping[tuple[str, int], frozenset[int]]

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass
class World:
    pods: dict[str, WorldPod] = field(default_factory=dict)
    identities: dict[int, LabelSet] = field(default_factory=dict)

    def identity_world(self) -> IdentityWorld:
        named: dict[int, dict[tuple[str, int], frozenset[int]]] = {}
        for pod in self.pods.values():
            ports = named.setdefault(pod.identity, {})
            for key, numbers in pod.named_ports.items():
                ports[key] = ports.get(key, frozenset()) | numbers
        return IdentityWorld(dict(self.identities), named)


def reserved_identities() -> dict[int, LabelSet]:
    return {int(r): LabelSet.from_strings([r.label]) for r in RESERVED if r.value != 0}


def build_world(resources: Iterable[Resource]) -> World:
    """Identities are numbered from 256 in order of their sorted labels, deterministically."""
    items = list(resources)
    ns_labels = {
        n.metadata.name: dict(n.metadata.labels) for n in items if isinstance(n, Namespace)
    }
    staged: list[tuple[Pod, LabelSet]] = []
    for pod in (p for p in items if isinstance(p, Pod)):
        namespace = pod.metadata.namespace or "default"
        labels = endpoint_labels(
            pod.metadata.labels,
            namespace,
            ns_labels.get(namespace, {"kubernetes.io/metadata.name": namespace}),
            service_account=pod.spec.serviceAccountName or "default",
        )
        staged.append((pod, labels))
    canon = sorted({labels.canonical(): labels for _, labels in staged}.items())
    ids = {c: CLUSTER_IDENTITY_MIN + i for i, (c, _) in enumerate(canon)}
    world = World(identities=reserved_identities())
    for c, labels in canon:
        world.identities[ids[c]] = labels
    for pod, labels in staged:
        named: dict[tuple[str, int], frozenset[int]] = {}
        for container in pod.spec.containers:
            for port in container.ports:
                if port.name:
                    key = (port.name, PROTOCOL_NUMBERS[port.protocol])
                    named[key] = named.get(key, frozenset()) | {port.containerPort}
        wp = WorldPod(pod.metadata.namespace or "default", pod.metadata.name, labels,
                      ids[labels.canonical()], named)  # fmt: skip
        world.pods[wp.key] = wp
    return world


class SequentialCIDRAllocator:
    """Deterministic CIDR identities for offline use: 1<<24 + n in order of first request."""

    def __init__(self) -> None:
        self.assigned: dict[str, int] = {}

    def __call__(self, prefix: str) -> int:
        return self.assigned.setdefault(prefix, CIDR_IDENTITY_BASE + 1 + len(self.assigned))


def compile_world(
    world: World, policies: Iterable[PolicyResource] | PolicySet
) -> tuple[PolicyEngine, CompileResult]:
    policy_set = policies if isinstance(policies, PolicySet) else normalize(list(policies))
    engine = PolicyEngine(
        policy_set, world.identity_world(), allocate_cidr=SequentialCIDRAllocator()
    )
    return engine, engine.compile_all()


@dataclass(frozen=True)
class Trace:
    src: str
    dst: str
    proto: int
    port: int
    egress: LookupResult
    ingress: LookupResult

    @property
    def allowed(self) -> bool:
        return self.egress.allowed and self.ingress.allowed

    def as_dict(self) -> dict[str, object]:
        def side(r: LookupResult) -> dict[str, object]:
            key = None
            if r.key is not None:
                key = {"peer": r.key.peer, "proto": r.key.proto, "port": r.key.port,
                       "port_prefixlen": r.key.prefixlen}  # fmt: skip
            return {"verdict": r.verdict.value, "entry": key, "rules": list(r.cookies),
                    "proxy_port": r.proxy_port}  # fmt: skip

        return {
            "src": self.src, "dst": self.dst, "proto": self.proto, "port": self.port,
            "verdict": "allowed" if self.allowed else "denied",
            "egress": side(self.egress), "ingress": side(self.ingress),
        }  # fmt: skip


def trace(result: CompileResult, world: World, src: str, dst: str, proto: int, port: int) -> Trace:
    """Egress at the source's map, then ingress at the destination's, both as BPF looks up."""
    s, d = world.pods[src], world.pods[dst]
    eg = lookup(result.policies.get(s.identity), d.identity, Direction.EGRESS, proto, port)
    ig = lookup(result.policies.get(d.identity), s.identity, Direction.INGRESS, proto, port)
    return Trace(src, dst, proto, port, eg, ig)


def matrix(
    result: CompileResult, world: World, proto: int, port: int
) -> dict[str, dict[str, bool]]:
    """``{src: {dst: allowed}}`` for every ordered pair of distinct pods."""
    out: dict[str, dict[str, bool]] = {}
    for src in sorted(world.pods):
        out[src] = {
            dst: trace(result, world, src, dst, proto, port).allowed
            for dst in sorted(world.pods)
            if dst != src
        }
    return out

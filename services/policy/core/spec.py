"""Normalized rules: NetworkPolicy, CNP and CCNP reduced to one typed shape.

Namespaced policies are scoped here, once: the subject selector gains the policy's namespace,
and so do peer endpoint selectors unless they name ``io.kubernetes.pod.namespace`` themselves.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from ciliate.labels.k8s import NAMESPACE_LABELS_PREFIX, POD_NAMESPACE_LABEL
from ciliate.matchpattern import name_matches, pattern_matches
from ciliate.resources.ciliumpolicy import (
    CiliumClusterwideNetworkPolicy,
    CiliumNetworkPolicy,
    CiliumRule,
    EgressRule,
    IngressRule,
    PortRule,
)
from ciliate.resources.networkpolicy import NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort
from ciliate.resources.selectors import (
    CompiledSelector,
    LabelSelector,
    Operator,
    Requirement,
)


class Direction(StrEnum):
    INGRESS = "ingress"
    EGRESS = "egress"


PROTOCOL_NUMBERS: dict[str, int] = {
    "ANY": 0, "ICMP": 1, "TCP": 6, "UDP": 17, "ICMPV6": 58, "SCTP": 132,
}  # fmt: skip
L4_PROTOCOLS: tuple[int, ...] = (6, 17, 132)
"""What a port without a protocol (Cilium's ANY) expands to."""


class PeerKind(StrEnum):
    WILDCARD = "wildcard"
    SELECTOR = "selector"
    ENTITY = "entity"
    CIDR = "cidr"
    FQDN = "fqdn"  # toFQDNs: CIDR identities whose fqdn: labels match


@dataclass(frozen=True)
class FQDNSelector:
    """One ``matchName`` or ``matchPattern`` (``rules.dns`` entry or ``toFQDNs`` peer), as
    :mod:`ciliate.matchpattern` defines them."""

    match_name: str = ""
    match_pattern: str = ""

    def matches(self, name: str) -> bool:
        if self.match_name and name_matches(self.match_name, name):
            return True
        return bool(self.match_pattern) and pattern_matches(self.match_pattern, name)

    def __str__(self) -> str:
        if self.match_name:
            return f"matchName:{self.match_name}"
        return f"matchPattern:{self.match_pattern}"


DNSRule = FQDNSelector


@dataclass(frozen=True)
class Peer:
    kind: PeerKind
    selector: CompiledSelector | None = None
    entity: str = ""
    cidr: str = ""
    excepts: tuple[str, ...] = ()
    fqdn: FQDNSelector | None = None

    def __str__(self) -> str:
        if self.kind is PeerKind.SELECTOR:
            return f"endpoints{self.selector}"
        if self.kind is PeerKind.ENTITY:
            return f"entity:{self.entity}"
        if self.kind is PeerKind.CIDR:
            tail = f" except {','.join(self.excepts)}" if self.excepts else ""
            return f"cidr:{self.cidr}{tail}"
        if self.kind is PeerKind.FQDN:
            return f"fqdn:{self.fqdn}"
        return "any"


WILDCARD_PEER = Peer(PeerKind.WILDCARD)


@dataclass(frozen=True)
class PortSpec:
    """proto 0 = any; port 0 = any, a str = a named port; end_port 0 = a single port."""

    proto: int = 0
    port: int | str = 0
    end_port: int = 0


@dataclass(frozen=True)
class HTTPRule:
    method: str = ""
    path: str = ""
    host: str = ""
    headers: tuple[str, ...] = ()


@dataclass(frozen=True)
class Rule:
    """One allow or deny statement for the endpoints ``subject`` selects.

    ``peers`` empty means the rule selects no peer at all (Kubernetes ``from: []`` is normalized
    to the wildcard before this point). ``ports`` empty means every protocol and port.
    """

    cookie: str
    subject: CompiledSelector
    direction: Direction
    deny: bool
    peers: tuple[Peer, ...]
    ports: tuple[PortSpec, ...] = ()
    http: tuple[HTTPRule, ...] = ()
    requires: tuple[CompiledSelector, ...] = ()
    dns: tuple[DNSRule, ...] = ()
    """``rules.dns``: the ports are redirected to the node's DNS proxy with these names."""


@dataclass(frozen=True)
class Enforcement:
    """A policy selecting ``subject`` switches these directions to default-deny (or declines to)."""

    cookie: str
    subject: CompiledSelector
    direction: Direction
    default_deny: bool


@dataclass(frozen=True)
class PolicySet:
    rules: tuple[Rule, ...] = ()
    enforcements: tuple[Enforcement, ...] = ()

    def __add__(self, other: PolicySet) -> PolicySet:
        return PolicySet(self.rules + other.rules, self.enforcements + other.enforcements)


def _ns_requirement(namespace: str) -> Requirement:
    return Requirement("k8s", POD_NAMESPACE_LABEL, Operator.IN, frozenset({namespace}))


def scope(selector: CompiledSelector, namespace: str | None) -> CompiledSelector:
    """Restrict to ``namespace`` unless the selector already names the namespace label."""
    if namespace is None or selector.mentions(POD_NAMESPACE_LABEL):
        return selector
    return selector.with_requirement(_ns_requirement(namespace))


def namespace_selector(selector: LabelSelector) -> CompiledSelector:
    """A namespaceSelector matches the pods' ``io.cilium.k8s.namespace.labels.*`` labels."""
    reqs = [
        Requirement("k8s", NAMESPACE_LABELS_PREFIX + r.key, r.operator, r.values)
        for r in selector.compile().requirements
    ]
    # Only pods live in namespaces: `namespaceSelector: {}` selects every pod, not the world.
    reqs.append(Requirement("k8s", POD_NAMESPACE_LABEL, Operator.EXISTS, frozenset()))
    return CompiledSelector(tuple(sorted(set(reqs), key=lambda r: r._sort_key())))


def policy_key(kind: str, namespace: str | None, name: str) -> str:
    return f"{kind}/{namespace}/{name}" if namespace else f"{kind}/{name}"


# --- Kubernetes NetworkPolicy -----------------------------------------------------------------


def _k8s_peer(peer: NetworkPolicyPeer, namespace: str) -> Peer:
    if peer.ipBlock is not None:
        return Peer(PeerKind.CIDR, cidr=peer.ipBlock.cidr, excepts=tuple(peer.ipBlock.except_))
    if peer.namespaceSelector is not None:
        sel = namespace_selector(peer.namespaceSelector)
        if peer.podSelector is not None:
            sel = sel.and_(peer.podSelector.compile())
        return Peer(PeerKind.SELECTOR, selector=sel)
    assert peer.podSelector is not None
    return Peer(PeerKind.SELECTOR, selector=scope(peer.podSelector.compile(), namespace))


def _k8s_port(port: NetworkPolicyPort) -> PortSpec:
    return PortSpec(PROTOCOL_NUMBERS[port.protocol], port.port or 0, port.endPort or 0)


def from_network_policy(np: NetworkPolicy) -> PolicySet:
    namespace = np.metadata.namespace or "default"
    base = policy_key("NetworkPolicy", namespace, np.metadata.name)
    subject = scope(np.spec.podSelector.compile(), namespace)
    ingress_on, egress_on = np.spec.effective_policy_types()
    rules: list[Rule] = []
    enforcements: list[Enforcement] = []
    sections = (
        (Direction.INGRESS, ingress_on, [(r.from_, r.ports) for r in np.spec.ingress or []]),
        (Direction.EGRESS, egress_on, [(r.to, r.ports) for r in np.spec.egress or []]),
    )
    for direction, enabled, items in sections:
        if not enabled:
            continue
        enforcements.append(Enforcement(base, subject, direction, True))
        for i, (peers, ports) in enumerate(items):
            peer_list = tuple(_k8s_peer(p, namespace) for p in peers) if peers else (WILDCARD_PEER,)
            port_list = tuple(_k8s_port(p) for p in ports or [])
            cookie = f"{base}/{direction.value}[{i}]"
            rules.append(Rule(cookie, subject, direction, False, peer_list, port_list))
    return PolicySet(tuple(rules), tuple(enforcements))


# --- Cilium ------------------------------------------------------------------------------------


def _cilium_ports(
    port_rules: list[PortRule] | None,
) -> tuple[tuple[PortSpec, ...], tuple[HTTPRule, ...], tuple[DNSRule, ...]]:
    specs: list[PortSpec] = []
    http: list[HTTPRule] = []
    dns: list[DNSRule] = []
    for pr in port_rules or []:
        for pp in pr.ports:
            port: int | str = pp.port
            if isinstance(port, str) and port.isdigit():
                port = int(port)
            specs.append(PortSpec(PROTOCOL_NUMBERS[pp.protocol], port, pp.endPort or 0))
        if pr.rules is not None:
            for h in pr.rules.http or []:
                http.append(HTTPRule(h.method or "", h.path or "", h.host or "", tuple(h.headers)))
            for d in pr.rules.dns or []:
                rule = DNSRule(d.matchName or "", d.matchPattern or "")
                if rule not in dns:
                    dns.append(rule)
    return tuple(specs), tuple(http), tuple(dns)


def _icmp_ports(rule: IngressRule | EgressRule) -> tuple[PortSpec, ...]:
    out: list[PortSpec] = []
    for icmp in rule.icmps or []:
        for f in icmp.fields:
            proto = PROTOCOL_NUMBERS["ICMP" if f.family == "IPv4" else "ICMPV6"]
            icmp_type = f.type if isinstance(f.type, int) else ICMP_TYPES.get(f.type, 0)
            out.append(PortSpec(proto, icmp_type))
    return tuple(out)


ICMP_TYPES: dict[str, int] = {
    "EchoReply": 0, "DestinationUnreachable": 3, "Redirect": 5, "EchoRequest": 8,
    "RouterAdvertisement": 9, "RouterSelection": 10, "TimeExceeded": 11, "ParameterProblem": 12,
    "Timestamp": 13, "TimestampReply": 14, "Photuris": 40, "ExtendedEchoRequest": 42,
    "ExtendedEchoReply": 43,
}  # fmt: skip


def _cilium_peers(rule: IngressRule | EgressRule, namespace: str | None) -> tuple[Peer, ...] | None:
    """The rule's L3 peers, or None when it names none (then it is L4-only: any peer)."""
    if isinstance(rule, IngressRule):
        endpoints, entities = rule.fromEndpoints, rule.fromEntities
        cidrs, cidr_sets = rule.fromCIDR, rule.fromCIDRSet
    else:
        endpoints, entities = rule.toEndpoints, rule.toEntities
        cidrs, cidr_sets = rule.toCIDR, rule.toCIDRSet
        if rule.toFQDNs is not None:
            return tuple(
                Peer(PeerKind.FQDN, fqdn=DNSRule(f.matchName or "", f.matchPattern or ""))
                for f in rule.toFQDNs
            )
    if endpoints is None and entities is None and cidrs is None and cidr_sets is None:
        return None
    peers: list[Peer] = []
    for sel in endpoints or []:
        compiled = sel.compile()
        if compiled.is_wildcard and namespace is None:
            peers.append(WILDCARD_PEER)
        else:
            peers.append(Peer(PeerKind.SELECTOR, selector=scope(compiled, namespace)))
    peers += [Peer(PeerKind.ENTITY, entity=e) for e in entities or []]
    peers += [Peer(PeerKind.CIDR, cidr=c) for c in cidrs or []]
    peers += [
        Peer(PeerKind.CIDR, cidr=c.cidr, excepts=tuple(c.except_))
        for c in cidr_sets or []
        if c.cidr is not None
    ]
    return tuple(peers)


def _cilium_rule(rule: CiliumRule, base: str, namespace: str | None) -> PolicySet:
    assert rule.endpointSelector is not None
    subject = scope(rule.endpointSelector.compile(), namespace)
    rules: list[Rule] = []
    enforcements: list[Enforcement] = []
    sections: tuple[tuple[Direction, bool, str, list[IngressRule | EgressRule]], ...] = (
        (Direction.INGRESS, False, "ingress", [*(rule.ingress or [])]),
        (Direction.INGRESS, True, "ingressDeny", [*(rule.ingressDeny or [])]),
        (Direction.EGRESS, False, "egress", [*(rule.egress or [])]),
        (Direction.EGRESS, True, "egressDeny", [*(rule.egressDeny or [])]),
    )
    present: dict[Direction, bool] = {Direction.INGRESS: False, Direction.EGRESS: False}
    for direction, deny, field, items in sections:
        for i, item in enumerate(items):
            present[direction] = True
            peers = _cilium_peers(item, namespace)
            ports, http, dns = _cilium_ports(item.toPorts)
            ports += _icmp_ports(item)
            reqs_src = item.fromRequires if isinstance(item, IngressRule) else item.toRequires
            requires = tuple(scope(r.compile(), namespace) for r in reqs_src or [])
            cookie = f"{base}/{field}[{i}]"
            if peers is None:
                peers = (WILDCARD_PEER,) if (ports or not requires) else ()
            rules.append(
                Rule(cookie, subject, direction, deny, peers, ports, http, requires, dns)
            )
    overrides = {
        Direction.INGRESS: rule.enableDefaultDeny.ingress,
        Direction.EGRESS: rule.enableDefaultDeny.egress,
    }
    for direction, on in present.items():
        if on:
            override = overrides[direction]
            enforcements.append(
                Enforcement(base, subject, direction, True if override is None else override)
            )
    return PolicySet(tuple(rules), tuple(enforcements))


def from_cilium_policy(cnp: CiliumNetworkPolicy | CiliumClusterwideNetworkPolicy) -> PolicySet:
    namespaced = isinstance(cnp, CiliumNetworkPolicy)
    namespace = (cnp.metadata.namespace or "default") if namespaced else None
    base = policy_key(cnp.kind, namespace, cnp.metadata.name)
    result = PolicySet()
    for i, rule in enumerate(cnp.rules()):
        if rule.endpointSelector is None:
            continue  # nodeSelector (host policies) has no pod endpoints to enforce on
        key = base if cnp.spec is not None and i == 0 else f"{base}/specs[{i}]"
        result = result + _cilium_rule(rule, key, namespace)
    return result


def normalize(
    policies: list[NetworkPolicy | CiliumNetworkPolicy | CiliumClusterwideNetworkPolicy],
) -> PolicySet:
    result = PolicySet()
    for policy in policies:
        if isinstance(policy, NetworkPolicy):
            result = result + from_network_policy(policy)
        else:
            result = result + from_cilium_policy(policy)
    return result

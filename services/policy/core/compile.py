"""Compile normalized rules into per-identity policy-map entries, and look them up as BPF does.

Map key: (peer identity, direction, protocol, port, port prefix length); peer 0 is "any",
protocol 0 is "any" (port then 0/0). Port ranges are split into power-of-two aligned blocks, so
an LPM lookup over (protocol, port) finds the most specific entry. Within one peer, an allow that
a deny covers is turned into a deny here, because the LPM lookup would otherwise prefer the more
specific allow; across peers (an exact identity versus 0) the lookup itself lets deny win.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from ciliate.labels import (
    CIDR_IDENTITY_BASE,
    CLUSTER_IDENTITY_MIN,
    LabelSet,
    ReservedIdentity,
)
from ciliate.resources.selectors import CompiledSelector
from services.policy.core.spec import (
    L4_PROTOCOLS,
    Direction,
    Peer,
    PeerKind,
    PolicySet,
    PortSpec,
    Rule,
)

ANY_PEER = 0
DEFAULT_MAP_CAPACITY = 16384
HTTP_PROXY_PORT = 15001
"""The L7 (HTTP) proxy listener every redirect entry points to."""

R = ReservedIdentity
ENTITY_RESERVED: dict[str, tuple[ReservedIdentity, ...]] = {
    "host": (R.HOST,),
    "remote-node": (R.REMOTE_NODE,),
    "kube-apiserver": (R.KUBE_APISERVER,),
    "health": (R.HEALTH,),
    "init": (R.INIT,),
    "unmanaged": (R.UNMANAGED,),
    "ingress": (R.INGRESS,),
    "world": (R.WORLD, R.WORLD_IPV4, R.WORLD_IPV6),
    "world-ipv4": (R.WORLD_IPV4,),
    "world-ipv6": (R.WORLD_IPV6,),
    "cluster": (R.HOST, R.REMOTE_NODE, R.INIT, R.HEALTH, R.UNMANAGED, R.INGRESS, R.KUBE_APISERVER),
    "none": (),
}
"""Entities as Cilium defines them; ``cluster`` also covers every cluster identity and ``world``
every CIDR identity; ``all`` is the wildcard peer."""


class Verdict(StrEnum):
    ALLOWED = "allowed"
    DENIED = "denied"  # a deny rule matched (Cilium's POLICY_DENY, 181)
    DEFAULT_DENIED = "default-denied"  # nothing allowed it (POLICY_DENIED, 133)
    REDIRECTED = "redirected"  # allowed via the L7 proxy


@dataclass(frozen=True, order=True)
class EntryKey:
    peer: int
    direction: Direction
    proto: int
    port: int
    prefixlen: int

    def covers(self, other: EntryKey) -> bool:
        """Does this (proto, port/prefix) block include ``other``'s (same peer and direction)?"""
        if self.peer != other.peer or self.direction != other.direction:
            return False
        if self.proto == 0:
            return True
        if self.proto != other.proto:
            return False
        if self.prefixlen > other.prefixlen:
            return False
        shift = 16 - self.prefixlen
        return (self.port >> shift) == (other.port >> shift)

    def lpm_bits(self) -> int:
        return 0 if self.proto == 0 else 8 + self.prefixlen


@dataclass
class EntryValue:
    deny: bool = False
    proxy_port: int = 0
    cookies: set[str] = field(default_factory=set)

    def merge(self, other: EntryValue) -> None:
        if other.deny and not self.deny:
            self.deny, self.proxy_port, self.cookies = True, 0, set(other.cookies)
            return
        if self.deny and not other.deny:
            return
        self.proxy_port = max(self.proxy_port, other.proxy_port)
        self.cookies |= other.cookies


Entries = dict[EntryKey, EntryValue]


def port_blocks(start: int, end: int) -> list[tuple[int, int]]:
    """[start, end] as power-of-two aligned (port, prefixlen) blocks, as Cilium splits ranges."""
    blocks: list[tuple[int, int]] = []
    while start <= end:
        size = start & -start if start else 1 << 16
        while start + size - 1 > end:
            size >>= 1
        blocks.append((start, 16 - size.bit_length() + 1))
        start += size
    return blocks


NamedPorts = Mapping[int, Mapping[tuple[str, int], frozenset[int]]]
"""identity -> (port name, protocol) -> port numbers, from the pods' container ports."""


def port_keys(
    spec: PortSpec, names: Mapping[tuple[str, int], frozenset[int]]
) -> list[tuple[int, int, int]]:
    """(proto, port, prefixlen) triples for a port spec; named ports resolve through ``names``."""
    protos = L4_PROTOCOLS if spec.proto == 0 and spec.port != 0 else (spec.proto,)
    out: list[tuple[int, int, int]] = []
    for proto in protos:
        if proto == 0:
            out.append((0, 0, 0))
        elif isinstance(spec.port, str):
            for number in sorted(names.get((spec.port, proto), frozenset())):
                out.append((proto, number, 16))
        elif spec.port == 0:
            out.append((proto, 0, 0))
        elif spec.end_port and spec.end_port > spec.port:
            out += [(proto, p, plen) for p, plen in port_blocks(spec.port, spec.end_port)]
        else:
            out.append((proto, spec.port, 16))
    return out


def is_cidr_identity(ident: int) -> bool:
    return ident >= CIDR_IDENTITY_BASE


def cidr_of(labels: LabelSet) -> str | None:
    for label in labels:
        if label.source == "cidr":
            return label.key
    return None


@dataclass(frozen=True)
class IdentityWorld:
    """What the compiler may select: identities with their labels, and named ports per identity."""

    identities: Mapping[int, LabelSet]
    named_ports: NamedPorts = field(default_factory=dict)

    def all_named_ports(self) -> dict[tuple[str, int], frozenset[int]]:
        merged: dict[tuple[str, int], frozenset[int]] = {}
        for ports in self.named_ports.values():
            for key, numbers in ports.items():
                merged[key] = merged.get(key, frozenset()) | numbers
        return merged


class SelectorCache:
    """Selector -> identities it selects, kept current as identities come and go.

    Every distinct selector is evaluated once per identity; ``add`` reports which selectors
    gained the new identity so callers recompile only what those selectors feed.
    """

    def __init__(self, identities: Mapping[int, LabelSet]) -> None:
        self.identities: dict[int, LabelSet] = dict(identities)
        self._selections: dict[CompiledSelector, set[int]] = {}

    def select(self, selector: CompiledSelector) -> set[int]:
        found = self._selections.get(selector)
        if found is None:
            found = {
                ident for ident, labels in self.identities.items()
                if not is_cidr_identity(ident) and selector.matches_labels(labels)
            }  # fmt: skip
            self._selections[selector] = found
        return found

    def add(self, ident: int, labels: LabelSet) -> list[CompiledSelector]:
        self.identities[ident] = labels
        changed = []
        for selector, idents in self._selections.items():
            if not is_cidr_identity(ident) and selector.matches_labels(labels):
                idents.add(ident)
                changed.append(selector)
        return changed

    def remove(self, ident: int) -> list[CompiledSelector]:
        self.identities.pop(ident, None)
        changed = []
        for selector, idents in self._selections.items():
            if ident in idents:
                idents.discard(ident)
                changed.append(selector)
        return changed


CIDRAllocator = Callable[[str], int]
"""prefix -> CIDR identity (caller-supplied; must be deterministic for a pure compile)."""


def cidr_prefixes(policies: PolicySet) -> set[str]:
    """Every prefix the policies name (CIDRs and their excepts): each gets its own identity."""
    out: set[str] = set()
    for rule in policies.rules:
        for peer in rule.peers:
            if peer.kind is PeerKind.CIDR:
                out.add(peer.cidr)
                out.update(peer.excepts)
    return out


def peer_identities(peer: Peer, cache: SelectorCache) -> set[int]:
    """The identities a peer selects; {0} for the wildcard."""
    if peer.kind is PeerKind.WILDCARD:
        return {ANY_PEER}
    if peer.kind is PeerKind.SELECTOR:
        assert peer.selector is not None
        if peer.selector.is_wildcard:
            return {ANY_PEER}
        return set(cache.select(peer.selector))
    if peer.kind is PeerKind.ENTITY:
        if peer.entity == "all":
            return {ANY_PEER}
        out = {int(r) for r in ENTITY_RESERVED[peer.entity]}
        if peer.entity == "cluster":
            out |= {i for i in cache.identities if CLUSTER_IDENTITY_MIN <= i < CIDR_IDENTITY_BASE}
        if peer.entity.startswith("world"):
            version = {"world-ipv4": 4, "world-ipv6": 6}.get(peer.entity)
            out |= {
                i for i, labels in cache.identities.items()
                if (c := cidr_of(labels)) is not None
                and (version is None or ipaddress.ip_network(c).version == version)
            }  # fmt: skip
        return out
    net = ipaddress.ip_network(peer.cidr)
    excepts = [ipaddress.ip_network(e) for e in peer.excepts]
    out = set()
    if net.prefixlen == 0:
        out |= {int(R.WORLD), int(R.WORLD_IPV4 if net.version == 4 else R.WORLD_IPV6)}
    for ident, labels in cache.identities.items():
        prefix = cidr_of(labels)
        if prefix is None:
            continue
        inner = ipaddress.ip_network(prefix)
        if inner.version != net.version or not inner.subnet_of(net):  # type: ignore[arg-type]
            continue
        if any(inner.subnet_of(e) for e in excepts if e.version == inner.version):  # type: ignore[arg-type]
            continue
        out.add(ident)
    return out


@dataclass
class IdentityPolicy:
    """The compiled policy of one local identity: what the datapath loads for its endpoints."""

    identity: int
    enforce: dict[Direction, bool]
    entries: Entries
    l7: dict[EntryKey, list[tuple[str, tuple[object, ...]]]] = field(default_factory=dict)


@dataclass(frozen=True)
class Overflow:
    identity: int
    entries: int
    capacity: int

    def __str__(self) -> str:
        return (
            f"identity {self.identity}: policy needs {self.entries} map entries, "
            f"capacity is {self.capacity}; refused (not enforced half-way)"
        )


@dataclass
class CompileResult:
    policies: dict[int, IdentityPolicy]
    overflows: list[Overflow]
    ipcache: dict[str, int]
    """prefix -> CIDR identity for every prefix the policies name."""

    @property
    def ok(self) -> bool:
        return not self.overflows


class PolicyEngine:
    """Holds rules and identities; compiles one identity or all, and recompiles incrementally."""

    def __init__(
        self,
        policies: PolicySet,
        world: IdentityWorld,
        *,
        allocate_cidr: CIDRAllocator | None = None,
        capacity: int = DEFAULT_MAP_CAPACITY,
        allow_host_ingress: bool = True,
    ) -> None:
        self.policies = policies
        self.named_ports: dict[int, Mapping[tuple[str, int], frozenset[int]]] = dict(
            world.named_ports
        )
        self.capacity = capacity
        self.allow_host_ingress = allow_host_ingress
        identities = dict(world.identities)
        self.ipcache: dict[str, int] = {}
        known = {cidr_of(labels): i for i, labels in identities.items() if cidr_of(labels)}
        for prefix in sorted(cidr_prefixes(policies)):
            ident = known.get(prefix)
            if ident is None:
                if allocate_cidr is None:
                    raise ValueError(f"policy names {prefix} but no CIDR allocator was given")
                ident = allocate_cidr(prefix)
                identities[ident] = LabelSet.from_strings([f"cidr:{prefix}", "reserved:world"])
            self.ipcache[prefix] = ident
        self.cache = SelectorCache(identities)
        self.compiled: dict[int, IdentityPolicy] = {}

    # -- selection -------------------------------------------------------------------------

    def rules_for(self, local: int) -> list[Rule]:
        return [r for r in self.policies.rules if local in self.cache.select(r.subject)]

    def enforcement_for(self, local: int) -> dict[Direction, bool | None]:
        """None: no policy selects this direction; False: selected but default-deny disabled."""
        state: dict[Direction, bool | None] = {Direction.INGRESS: None, Direction.EGRESS: None}
        for enf in self.policies.enforcements:
            if local in self.cache.select(enf.subject):
                state[enf.direction] = bool(state[enf.direction]) or enf.default_deny
        return state

    # -- compile ---------------------------------------------------------------------------

    def compile_identity(self, local: int) -> IdentityPolicy:
        entries: Entries = {}
        l7: dict[EntryKey, list[tuple[str, tuple[object, ...]]]] = {}
        rules = self.rules_for(local)
        requires: dict[Direction, list[CompiledSelector]] = {d: [] for d in Direction}
        for rule in rules:
            requires[rule.direction] += rule.requires
        every_port = self._all_ports()
        for rule in rules:
            peers: set[int] = set()
            for peer in rule.peers:
                peers |= peer_identities(peer, self.cache)
            for sel in requires[rule.direction]:
                if not rule.deny:
                    matched = self.cache.select(sel)
                    peers = {p for p in peers if p == ANY_PEER or p in matched}
            proxy = HTTP_PROXY_PORT if rule.http and not rule.deny else 0
            for peer_id in peers:
                if rule.direction is Direction.INGRESS:
                    names = self.named_ports.get(local, {})
                elif peer_id == ANY_PEER or peer_id not in self.named_ports:
                    names = every_port
                else:
                    names = self.named_ports[peer_id]
                keys = (
                    [k for spec in rule.ports for k in port_keys(spec, names)]
                    if rule.ports
                    else [(0, 0, 0)]
                )
                for proto, port, plen in keys:
                    key = EntryKey(peer_id, rule.direction, proto, port, plen)
                    value = EntryValue(rule.deny, proxy, {rule.cookie})
                    if key in entries:
                        entries[key].merge(value)
                    else:
                        entries[key] = value
                    if proxy:
                        l7.setdefault(key, []).append((rule.cookie, rule.http))
        state = self.enforcement_for(local)
        enforce = {d: state[d] is not None for d in Direction}
        for direction in Direction:
            if state[direction] is False:  # selected, default-deny disabled: allow the rest
                key = EntryKey(ANY_PEER, direction, 0, 0, 0)
                entries.setdefault(key, EntryValue(False, 0, {"default-allow"}))
        if enforce[Direction.INGRESS] and self.allow_host_ingress:
            key = EntryKey(int(R.HOST), Direction.INGRESS, 0, 0, 0)
            entries.setdefault(key, EntryValue(False, 0, {"allow-localhost"}))
        _propagate_denies(entries)
        for key in [k for k in l7 if entries.get(k) is None or entries[k].deny]:
            del l7[key]
        return IdentityPolicy(local, enforce, entries, l7)

    def _all_ports(self) -> dict[tuple[str, int], frozenset[int]]:
        return IdentityWorld({}, self.named_ports).all_named_ports()

    def local_identities(self) -> list[int]:
        return sorted(
            i for i in self.cache.identities
            if CLUSTER_IDENTITY_MIN <= i < CIDR_IDENTITY_BASE
        )  # fmt: skip

    def compile_all(self) -> CompileResult:
        self.compiled = {i: self.compile_identity(i) for i in self.local_identities()}
        return self._result(self.compiled)

    def _result(self, policies: dict[int, IdentityPolicy]) -> CompileResult:
        overflows = [
            Overflow(i, len(p.entries), self.capacity)
            for i, p in sorted(policies.items())
            if len(p.entries) > self.capacity
        ]
        return CompileResult(policies, overflows, dict(self.ipcache))

    # -- incremental -----------------------------------------------------------------------

    def add_identity(
        self,
        ident: int,
        labels: LabelSet,
        named_ports: Mapping[tuple[str, int], frozenset[int]] | None = None,
    ) -> dict[int, EntryDelta]:
        """A new identity: recompile only the locals whose rules' selectors now select it."""
        if named_ports:
            self.named_ports[ident] = named_ports
        changed = set(self.cache.add(ident, labels))
        cidr = is_cidr_identity(ident)
        affected: set[int] = set()
        for rule in self.policies.rules:
            peer_hit = any(
                p.selector in changed
                or p.kind is PeerKind.ENTITY
                or (cidr and p.kind is PeerKind.CIDR)
                for p in rule.peers
            ) or any(s in changed for s in rule.requires)
            if peer_hit:
                affected |= self.cache.select(rule.subject)
        if CLUSTER_IDENTITY_MIN <= ident < CIDR_IDENTITY_BASE:
            affected.add(ident)
        return self._recompile(affected)

    def remove_identity(self, ident: int) -> dict[int, EntryDelta]:
        affected = {
            local for local, pol in self.compiled.items()
            if any(k.peer == ident for k in pol.entries)
        }  # fmt: skip
        self.cache.remove(ident)
        self.named_ports.pop(ident, None)
        deltas = self._recompile(affected - {ident})
        old = self.compiled.pop(ident, None)
        if old is not None:
            deltas[ident] = EntryDelta(added={}, removed=set(old.entries))
        return deltas

    def set_named_ports(
        self, ident: int, ports: Mapping[tuple[str, int], frozenset[int]]
    ) -> dict[int, EntryDelta]:
        """An identity's named ports changed: recompile the locals whose rules name ports."""
        if dict(self.named_ports.get(ident, {})) == dict(ports):
            return {}
        if ports:
            self.named_ports[ident] = ports
        else:
            self.named_ports.pop(ident, None)
        affected = {ident} if ident in self.compiled else set()
        for rule in self.policies.rules:
            if any(isinstance(spec.port, str) for spec in rule.ports):
                affected |= self.cache.select(rule.subject)
        return self._recompile(affected & set(self.local_identities()))

    def replace_policies(
        self, policies: PolicySet, allocate_cidr: CIDRAllocator | None = None
    ) -> dict[int, EntryDelta]:
        """New rules: recompile only the locals that old or new changed rules select.

        Prefixes the new rules name get CIDR identities first (from the cache's labels when
        known, else ``allocate_cidr``); those new identities also touch every rule whose peers
        are entities or CIDRs, since ``world`` and wider prefixes select them.
        """
        old_rules, new_rules = set(self.policies.rules), set(policies.rules)
        old_enf, new_enf = set(self.policies.enforcements), set(policies.enforcements)
        known = {c: i for i, labels in self.cache.identities.items() if (c := cidr_of(labels))}
        ipcache: dict[str, int] = {}
        added_cidr = False
        for prefix in sorted(cidr_prefixes(policies)):
            ident = self.ipcache.get(prefix, known.get(prefix))
            if ident is None:
                if allocate_cidr is None:
                    raise ValueError(f"policy names {prefix} but no CIDR allocator was given")
                ident = allocate_cidr(prefix)
            if ident not in self.cache.identities:
                labels = LabelSet.from_strings([f"cidr:{prefix}", "reserved:world"])
                self.cache.add(ident, labels)
                added_cidr = True
            ipcache[prefix] = ident
        affected: set[int] = set()
        for rule in old_rules ^ new_rules:
            affected |= self.cache.select(rule.subject)
        for enf in old_enf ^ new_enf:
            affected |= self.cache.select(enf.subject)
        if added_cidr:
            for rule in new_rules | old_rules:
                if any(p.kind in (PeerKind.ENTITY, PeerKind.CIDR) for p in rule.peers):
                    affected |= self.cache.select(rule.subject)
        self.policies = policies
        self.ipcache = ipcache
        return self._recompile(affected & set(self.local_identities()))

    def _recompile(self, locals_: Iterable[int]) -> dict[int, EntryDelta]:
        deltas: dict[int, EntryDelta] = {}
        for local in sorted(locals_):
            new = self.compile_identity(local)
            old = self.compiled.get(local)
            delta = diff_entries(old.entries if old else {}, new.entries)
            self.compiled[local] = new
            if delta or old is None or old.enforce != new.enforce:
                deltas[local] = delta
        return deltas


@dataclass
class EntryDelta:
    added: dict[EntryKey, EntryValue]
    removed: set[EntryKey]

    def __bool__(self) -> bool:
        return bool(self.added or self.removed)


def diff_entries(old: Entries, new: Entries) -> EntryDelta:
    added = {k: v for k, v in new.items() if old.get(k) != v}
    removed = {k for k in old if k not in new}
    return EntryDelta(added, removed)


def _propagate_denies(entries: Entries) -> None:
    """An allow covered by a deny of the same peer becomes that deny (see module docstring)."""
    denies = [k for k, v in entries.items() if v.deny]
    if not denies:
        return
    for key, value in entries.items():
        if value.deny:
            continue
        for deny in denies:
            if deny.covers(key):
                entries[key] = EntryValue(True, 0, set(entries[deny].cookies))
                break


# -- lookup: what the BPF program does ---------------------------------------------------------


def lpm(
    entries: Entries, peer: int, direction: Direction, proto: int, port: int
) -> EntryKey | None:
    """Longest-prefix match over (protocol, port) among one peer's entries."""
    candidates = [
        EntryKey(peer, direction, proto, port, 16),
        *[
            EntryKey(peer, direction, proto, port & ~((1 << (16 - p)) - 1) if p else 0, p)
            for p in range(15, -1, -1)
        ],
        EntryKey(peer, direction, 0, 0, 0),
    ]
    for key in candidates:
        if key in entries:
            return key
    return None


@dataclass(frozen=True)
class LookupResult:
    verdict: Verdict
    key: EntryKey | None
    cookies: tuple[str, ...]
    proxy_port: int = 0

    @property
    def allowed(self) -> bool:
        return self.verdict in (Verdict.ALLOWED, Verdict.REDIRECTED)


def lookup(
    policy: IdentityPolicy | None, peer: int, direction: Direction, proto: int, port: int
) -> LookupResult:
    """Cilium's precedence: exact-peer and any-peer lookups; deny wins, then a proxy redirect,
    then the more specific L4 match; nothing found under enforcement is a default deny."""
    if policy is None or not policy.enforce.get(direction, False):
        return LookupResult(Verdict.ALLOWED, None, ("no policy selects this direction",))
    if proto in (1, 58):
        pass  # ICMP: the type travels in the port field
    found = [
        k
        for k in (
            lpm(policy.entries, peer, direction, proto, port),
            lpm(policy.entries, ANY_PEER, direction, proto, port) if peer != ANY_PEER else None,
        )
        if k is not None
    ]
    if not found:
        return LookupResult(Verdict.DEFAULT_DENIED, None, ())
    values = [(k, policy.entries[k]) for k in found]
    denies = [(k, v) for k, v in values if v.deny]
    if denies:
        k, v = denies[0]
        return LookupResult(Verdict.DENIED, k, tuple(sorted(v.cookies)))
    redirects = [(k, v) for k, v in values if v.proxy_port]
    pool = redirects or values
    k, v = max(pool, key=lambda kv: (kv[0].lpm_bits(), kv[0].peer != ANY_PEER))
    verdict = Verdict.REDIRECTED if v.proxy_port else Verdict.ALLOWED
    return LookupResult(verdict, k, tuple(sorted(v.cookies)), v.proxy_port)

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
from ciliate.resources.selectors import CompiledSelector, Operator, Requirement
from services.policy.core.spec import (
    L4_PROTOCOLS,
    Direction,
    Enforcement,
    Peer,
    PeerKind,
    PolicySet,
    PortSpec,
    Rule,
)

FQDN_SOURCE = "fqdn"

ANY_PEER = 0
DEFAULT_MAP_CAPACITY = 16384
HTTP_PROXY_PORT = 15001
"""The L7 (HTTP) proxy listener every ``rules.http`` redirect entry points to."""
DNS_PROXY_PORT = 15053
"""The node's DNS proxy listener every ``rules.dns`` redirect entry points to."""

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
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Keys are hashed millions of times per full compile: compute the hash once.
        fields = (self.peer, self.direction.value, self.proto, self.port, self.prefixlen)
        object.__setattr__(self, "_hash", hash(fields))

    def __hash__(self) -> int:
        return self._hash

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

    def merged(self, other: EntryValue) -> EntryValue:
        """A new value: this one merged with ``other`` (values shared between maps stay put)."""
        out = EntryValue(self.deny, self.proxy_port, set(self.cookies))
        out.merge(other)
        return out


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


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class SelectorCache:
    """Selector -> identities it selects, kept current as identities come and go.

    Selections are computed from inverted label indexes (set intersections, not one match per
    identity) with exactly :meth:`CompiledSelector.matches_labels`' semantics; ``add`` reports
    which selectors gained the new identity so callers recompile only what those selectors feed.
    CIDR identities are never selected by endpoint selectors; their prefixes are kept parsed.
    """

    def __init__(self, identities: Mapping[int, LabelSet]) -> None:
        self.identities: dict[int, LabelSet] = {}
        self.cidrs: dict[int, Network] = {}
        self.fqdns: dict[int, tuple[str, ...]] = {}
        """CIDR identities learned from DNS answers -> their ``fqdn:`` names (toFQDNs)."""
        self._selections: dict[CompiledSelector, set[int]] = {}
        self._by_object: dict[int, tuple[CompiledSelector, set[int]]] = {}
        """id(selector) -> (selector, its selection): rules keep their selector objects, and
        hashing a selector (nested frozen dataclasses) on every lookup cost ~3 ms a new pod."""
        self._all: set[int] = set()
        self._by_key: dict[tuple[str | None, str], set[int]] = {}
        self._by_value: dict[tuple[str | None, str, str], set[int]] = {}
        for ident, labels in identities.items():
            self._index(ident, labels)

    def _index(self, ident: int, labels: LabelSet) -> None:
        self.identities[ident] = labels
        prefix = cidr_of(labels)
        if prefix is not None:
            self.cidrs[ident] = ipaddress.ip_network(prefix)
        names = fqdn_names(labels)
        if names:
            self.fqdns[ident] = names
        if is_cidr_identity(ident):
            return
        self._all.add(ident)
        for label in labels:
            for source in (None, label.source):
                self._by_key.setdefault((source, label.key), set()).add(ident)
                self._by_value.setdefault((source, label.key, label.value), set()).add(ident)

    def _unindex(self, ident: int) -> None:
        labels = self.identities.pop(ident, None)
        self.cidrs.pop(ident, None)
        self.fqdns.pop(ident, None)
        self._all.discard(ident)
        for label in labels or ():
            for source in (None, label.source):
                self._by_key.get((source, label.key), set()).discard(ident)
                self._by_value.get((source, label.key, label.value), set()).discard(ident)

    def _requirement(self, req: Requirement) -> set[int]:
        if req.operator is Operator.EXISTS:
            return self._by_key.get((req.source, req.key), set())
        if req.operator is Operator.DOES_NOT_EXIST:
            return self._all - self._by_key.get((req.source, req.key), set())
        hits: set[int] = set()
        for value in req.values:
            hits |= self._by_value.get((req.source, req.key, value), set())
        return hits if req.operator is Operator.IN else self._all - hits

    def select(self, selector: CompiledSelector) -> set[int]:
        known = self._by_object.get(id(selector))
        if known is not None and known[0] is selector:
            return known[1]
        found = self._selections.get(selector)
        if found is None:
            found = set(self._all)
            for req in selector.requirements:
                found &= self._requirement(req)
                if not found:
                    break
            self._selections[selector] = found
        self._by_object[id(selector)] = (selector, found)  # the same set: add/remove keep it
        return found

    def add(self, ident: int, labels: LabelSet) -> list[CompiledSelector]:
        if ident in self.identities:
            self.remove(ident)
        self._index(ident, labels)
        changed = []
        if not is_cidr_identity(ident):
            for selector, idents in self._selections.items():
                if selector.matches_labels(labels):
                    idents.add(ident)
                    changed.append(selector)
        return changed

    def remove(self, ident: int) -> list[CompiledSelector]:
        self._unindex(ident)
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


def fqdn_names(labels: LabelSet) -> tuple[str, ...]:
    """The names of an identity's ``fqdn:`` labels (``fqdn:NAME``: the key is the name)."""
    return tuple(sorted(label.key for label in labels if label.source == FQDN_SOURCE))


def fqdn_peer_hit(peer: Peer, names: Iterable[str]) -> bool:
    return peer.fqdn is not None and any(peer.fqdn.matches(n) for n in names)


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
                i for i, net in cache.cidrs.items()
                if version is None or net.version == version
            }  # fmt: skip
        return out
    if peer.kind is PeerKind.FQDN:
        # Cilium: an FQDN selector selects the identities of the IPs learned for names that
        # match it; those IPs' identities carry one fqdn: label per name.
        return {i for i, names in cache.fqdns.items() if fqdn_peer_hit(peer, names)}
    net = ipaddress.ip_network(peer.cidr)
    excepts = [ipaddress.ip_network(e) for e in peer.excepts]
    out = set()
    if net.prefixlen == 0:
        out |= {int(R.WORLD), int(R.WORLD_IPV4 if net.version == 4 else R.WORLD_IPV6)}
    for ident, inner in cache.cidrs.items():
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
        known = {cidr_of(labels): i for i, labels in identities.items()
                 if cidr_of(labels) and not fqdn_names(labels)}
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
        # Per-rule caches (a rule's peers and its entries are the same for every local it
        # selects, unless it names ports or another rule of the local has requirements).
        self._peer_sets: dict[Rule, frozenset[int]] = {}
        self._contrib: dict[Rule, Entries] = {}
        self._peer_part: dict[Rule, tuple[frozenset[int], int, Entries]] = {}
        """Rule -> (its peer set, a peer, the rule's entries for that peer alone): a new
        identity's entries are the same in every local the rule selects (~20), so its
        propagation builds them once a rule and the maps share the key and value objects."""
        self._rule_index: dict[int, list[Rule]] | None = None
        self._enf_index: dict[int, list[Enforcement]] | None = None
        self._every_port: dict[tuple[str, int], frozenset[int]] | None = None

    def _extend_contributions(self, rules: Iterable[Rule]) -> None:
        """Rules whose peers grew (an identity came): add the new peers' entries to their
        cached contributions instead of dropping them (entries of different peers never
        interact), so the next compile of their subjects does not rebuild them whole."""
        for rule in rules:
            old_peers = self._peer_sets.pop(rule, None)
            cached = self._contrib.pop(rule, None)
            if old_peers is None or cached is None:
                continue
            peers = self._rule_peers(rule)
            if not old_peers <= peers:
                continue  # a peer left too: rebuilt on demand
            added = peers - old_peers
            if added:  # cached contributions have no named ports: the local is not used
                cached = {**cached, **self._rule_entries(rule, ANY_PEER, sorted(added))}
            self._contrib[rule] = cached

    def _invalidate(self, rules: Iterable[Rule] = (), *, selections: bool = True) -> None:
        for rule in rules:
            self._peer_sets.pop(rule, None)
            self._contrib.pop(rule, None)
        if selections:
            self._rule_index = None
            self._enf_index = None

    # -- selection -------------------------------------------------------------------------

    def _indexes(self) -> tuple[dict[int, list[Rule]], dict[int, list[Enforcement]]]:
        if self._rule_index is None or self._enf_index is None:
            rules: dict[int, list[Rule]] = {}
            for rule in self.policies.rules:
                for local in self.cache.select(rule.subject):
                    rules.setdefault(local, []).append(rule)
            enfs: dict[int, list[Enforcement]] = {}
            for enf in self.policies.enforcements:
                for local in self.cache.select(enf.subject):
                    enfs.setdefault(local, []).append(enf)
            self._rule_index, self._enf_index = rules, enfs
        return self._rule_index, self._enf_index

    def rules_for(self, local: int) -> list[Rule]:
        return list(self._indexes()[0].get(local, ()))

    def enforcement_for(self, local: int) -> dict[Direction, bool | None]:
        """None: no policy selects this direction; False: selected but default-deny disabled."""
        state: dict[Direction, bool | None] = {Direction.INGRESS: None, Direction.EGRESS: None}
        for enf in self._indexes()[1].get(local, ()):
            state[enf.direction] = bool(state[enf.direction]) or enf.default_deny
        return state

    def _rule_peers(self, rule: Rule) -> frozenset[int]:
        found = self._peer_sets.get(rule)
        if found is None:
            peers: set[int] = set()
            for peer in rule.peers:
                peers |= peer_identities(peer, self.cache)
            found = self._peer_sets[rule] = frozenset(peers)
        return found

    # -- compile ---------------------------------------------------------------------------

    def _rule_entries(self, rule: Rule, local: int, peers: Iterable[int]) -> Entries:
        """The entries one rule gives ``local`` for ``peers`` (one shared value object: values
        are never mutated once made, merges build new ones)."""
        proxy = 0
        if not rule.deny:
            proxy = DNS_PROXY_PORT if rule.dns else HTTP_PROXY_PORT if rule.http else 0
        value = EntryValue(rule.deny, proxy, {rule.cookie})
        named = any(isinstance(spec.port, str) for spec in rule.ports)
        static = None
        if not named:
            static = [k for spec in rule.ports for k in port_keys(spec, {})] or [(0, 0, 0)]
        out: Entries = {}
        for peer_id in peers:
            keys = static
            if keys is None:
                if rule.direction is Direction.INGRESS:
                    names = self.named_ports.get(local, {})
                elif peer_id == ANY_PEER or peer_id not in self.named_ports:
                    names = self._all_ports()
                else:
                    names = self.named_ports[peer_id]
                keys = [k for spec in rule.ports for k in port_keys(spec, names)]
            for proto, port, plen in keys:
                out[EntryKey(peer_id, rule.direction, proto, port, plen)] = value
        return out

    def _contribution(
        self, rule: Rule, local: int, requires: list[CompiledSelector], only_peer: int | None
    ) -> Entries:
        rule_peers = self._rule_peers(rule)
        peers: Iterable[int] = rule_peers
        filtered = bool(requires) and not rule.deny
        named = any(isinstance(s.port, str) for s in rule.ports)
        if only_peer is not None and not filtered and not named:
            part = self._peer_part.get(rule)
            if part is None or part[0] is not rule_peers or part[1] != only_peer:
                wanted = [only_peer] if only_peer in rule_peers else []
                part = (rule_peers, only_peer, self._rule_entries(rule, local, wanted))
                self._peer_part[rule] = part
            return part[2]
        if only_peer is not None:
            peers = [only_peer] if only_peer in peers else []
        if filtered:
            for sel in requires:
                matched = self.cache.select(sel)
                peers = [p for p in peers if p == ANY_PEER or p in matched]
        if only_peer is not None or filtered or named:
            return self._rule_entries(rule, local, peers)
        cached = self._contrib.get(rule)
        if cached is None:
            cached = self._contrib[rule] = self._rule_entries(rule, local, peers)
        return cached

    def compile_identity(self, local: int, only_peer: int | None = None) -> IdentityPolicy:
        """The map of ``local``; with ``only_peer``, just the entries whose peer is that one
        (entries of different peers never interact, so a new peer is merged in as a part)."""
        entries: Entries = {}
        l7: dict[EntryKey, list[tuple[str, tuple[object, ...]]]] = {}
        rules = self.rules_for(local)
        requires: dict[Direction, list[CompiledSelector]] = {d: [] for d in Direction}
        for rule in rules:
            requires[rule.direction] += rule.requires
        allows: list[tuple[Rule, Entries]] = []
        deny_peers: set[int] = set()
        deny_keys: list[EntryKey] = []
        for rule in rules:
            contrib = self._contribution(rule, local, requires[rule.direction], only_peer)
            if not contrib:
                continue
            if rule.deny:
                deny_keys.extend(contrib)
                deny_peers.update(k.peer for k in contrib)
            else:
                allows.append((rule, contrib))
            if entries:
                common = entries.keys() & contrib.keys()
                saved = {k: entries[k] for k in common}
                entries.update(contrib)
                for k, old in saved.items():
                    entries[k] = old.merged(contrib[k])
            else:
                entries.update(contrib)
            if (rule.http or rule.dns) and not rule.deny:
                items = rule.http + rule.dns
                for key in contrib:
                    l7.setdefault(key, []).append((rule.cookie, items))
        state = self.enforcement_for(local)
        enforce = {d: state[d] is not None for d in Direction}
        if only_peer is None:
            for direction in Direction:
                if state[direction] is False:  # selected, default-deny disabled: allow the rest
                    key = EntryKey(ANY_PEER, direction, 0, 0, 0)
                    entries.setdefault(key, EntryValue(False, 0, {"default-allow"}))
        if enforce[Direction.INGRESS] and self.allow_host_ingress and only_peer in (
            None, int(R.HOST)
        ):
            key = EntryKey(int(R.HOST), Direction.INGRESS, 0, 0, 0)
            entries.setdefault(key, EntryValue(False, 0, {"allow-localhost"}))
        if deny_peers:
            candidates: list[EntryKey] = [
                k for p in (ANY_PEER, int(R.HOST)) for d in Direction
                if (k := EntryKey(p, d, 0, 0, 0)) in entries
            ]  # fmt: skip
            for rule, contrib in allows:
                if only_peer is not None or not deny_peers.isdisjoint(self._rule_peers(rule)):
                    candidates.extend(contrib)
            _propagate_denies(entries, candidates, deny_keys)
        for key in [k for k in l7 if entries.get(k) is None or entries[k].deny]:
            del l7[key]
        return IdentityPolicy(local, enforce, entries, l7)

    def _all_ports(self) -> dict[tuple[str, int], frozenset[int]]:
        if self._every_port is None:
            self._every_port = IdentityWorld({}, self.named_ports).all_named_ports()
        return self._every_port

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
        """A new identity: only the entries whose peer it is are computed for the locals whose
        rules now select it (plus its own map when it is a local)."""
        deltas, work = self.admit_identity(ident, labels, named_ports)
        deltas.update(self.propagate_identity(work))
        return deltas

    def admit_identity(
        self,
        ident: int,
        labels: LabelSet,
        named_ports: Mapping[tuple[str, int], frozenset[int]] | None = None,
    ) -> tuple[dict[int, EntryDelta], PeerWork]:
        """First half of :meth:`add_identity`: the identity joins the selections and its own
        map is compiled (a new pod waits on that one); the other locals' entries for it as a
        peer are left as ``PeerWork`` for :meth:`propagate_identity` (in as many parts as the
        caller likes, since entries of different peers never interact)."""
        deltas: dict[int, EntryDelta] = {}
        if ident in self.cache.identities:
            deltas = self.remove_identity(ident)
        if named_ports:
            self.named_ports[ident] = named_ports
            self._every_port = None
        changed = set(self.cache.add(ident, labels))
        cidr = is_cidr_identity(ident)
        names = self.cache.fqdns.get(ident, ())
        affected: set[int] = set()
        hit: list[Rule] = []
        for rule in self.policies.rules:
            peer_hit = any(
                p.selector in changed
                or p.kind is PeerKind.ENTITY
                or (cidr and p.kind is PeerKind.CIDR)
                or (bool(names) and p.kind is PeerKind.FQDN and fqdn_peer_hit(p, names))
                for p in rule.peers
            ) or any(s in changed for s in rule.requires)
            if peer_hit:
                hit.append(rule)
                affected |= self.cache.select(rule.subject)
        self._extend_contributions(hit)
        self._index_new(ident)
        required = any(rule.requires for rule in hit)
        if CLUSTER_IDENTITY_MIN <= ident < CIDR_IDENTITY_BASE:
            deltas.update(self._recompile([ident]))
        return deltas, PeerWork(ident, tuple(sorted(affected - {ident})), required)

    def propagate_identity(self, work: PeerWork) -> dict[int, EntryDelta]:
        """Second half of :meth:`add_identity` for ``work.locals``; locals that left meanwhile
        are skipped, as is all of it if the identity itself left."""
        deltas: dict[int, EntryDelta] = {}
        if work.ident not in self.cache.identities:
            return deltas
        for local in work.locals:
            current = self.compiled.get(local)
            if current is None or work.required:
                if local in self.cache.identities and (
                    CLUSTER_IDENTITY_MIN <= local < CIDR_IDENTITY_BASE
                ):
                    deltas.update(self._recompile([local]))
                continue
            part = self.compile_identity(local, only_peer=work.ident)
            if part.entries:
                current.entries.update(part.entries)
                current.l7.update(part.l7)
                deltas[local] = EntryDelta(added=dict(part.entries), removed=set())
        return deltas

    def _index_new(self, ident: int) -> None:
        """Add a new identity to the rule indexes (the other locals' selections are as they
        were), instead of rebuilding them."""
        if self._rule_index is None or self._enf_index is None:
            return
        self._rule_index.pop(ident, None)
        self._enf_index.pop(ident, None)
        rules = [r for r in self.policies.rules if ident in self.cache.select(r.subject)]
        enfs = [e for e in self.policies.enforcements if ident in self.cache.select(e.subject)]
        if rules:
            self._rule_index[ident] = rules
        if enfs:
            self._enf_index[ident] = enfs

    def remove_identity(self, ident: int) -> dict[int, EntryDelta]:
        hit = [rule for rule in self.policies.rules if ident in self._rule_peers(rule)]
        affected: set[int] = set()
        for rule in hit:
            affected |= self.cache.select(rule.subject)
        self.cache.remove(ident)
        if self.named_ports.pop(ident, None) is not None:
            self._every_port = None
        self._invalidate(hit)
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
        self._every_port = None
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
        known = {c: i for i, labels in self.cache.identities.items()
                 if (c := cidr_of(labels)) and not fqdn_names(labels)}  # FQDN ones come and go
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
        stale = [r for r in self._peer_sets.keys() | self._contrib.keys() if r not in new_rules]
        if added_cidr:
            stale += [r for r in new_rules
                      if any(p.kind in (PeerKind.ENTITY, PeerKind.CIDR) for p in r.peers)]
        self._invalidate(stale)
        self.policies = policies
        self.ipcache = ipcache
        return self._recompile(affected & set(self.local_identities()))

    def _recompile(self, locals_: Iterable[int]) -> dict[int, EntryDelta]:
        deltas: dict[int, EntryDelta] = {}
        for local in sorted(locals_):
            new = self.compile_identity(local)
            old = self.compiled.get(local)
            delta = (diff_entries(old.entries, new.entries) if old is not None
                     else EntryDelta(dict(new.entries), set()))
            self.compiled[local] = new
            if delta or old is None or old.enforce != new.enforce:
                deltas[local] = delta
        return deltas


@dataclass(frozen=True)
class PeerWork:
    """Locals still to get a new identity's entries as a peer (see ``admit_identity``)."""

    ident: int
    locals: tuple[int, ...]
    required: bool = False
    """Some hit rule has requirements: those locals are recompiled whole."""


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


def _propagate_denies(
    entries: Entries,
    candidates: Iterable[EntryKey] | None = None,
    deny_keys: Iterable[EntryKey] | None = None,
) -> None:
    """An allow covered by a deny of the same peer becomes that deny (see module docstring).

    ``candidates`` limits the allows examined and ``deny_keys`` names the denies (the caller
    knows both from the rules); None examines every entry."""
    denies: dict[tuple[int, Direction], list[EntryKey]] = {}
    for k in entries if deny_keys is None else deny_keys:
        if entries[k].deny:
            denies.setdefault((k.peer, k.direction), []).append(k)
    if not denies:
        return
    peers = {peer for peer, _ in denies}
    for key in entries if candidates is None else candidates:
        if key.peer not in peers:
            continue
        value = entries.get(key)
        if value is None or value.deny:
            continue
        for deny in denies.get((key.peer, key.direction), ()):
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

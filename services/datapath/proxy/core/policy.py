"""Which L7 rules apply to a redirected connection (KV ``policy``, ``endpoints``, ``ipcache``).

The proxy sees (source, original destination). The source endpoint's egress policy and the
destination endpoint's ingress policy are looked up as the BPF program does (exact peer and
any-peer entries, longest (protocol, port) prefix, deny wins, a redirect preferred); every one
that redirects contributes its L7 rules, and a request must pass all of them.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ciliate.policymap import iter_entries
from services.datapath.proxy.core.rules import L7Rules

WORLD_IDENTITY = 2
NO_L7 = L7Rules()
ANY_PEER = 0


@dataclass(frozen=True)
class Entry:
    deny: bool
    proxy_port: int
    rules: L7Rules
    cookies: tuple[str, ...]


EntryKey = tuple[int, str, int, int, int]  # peer, direction, proto, port, prefixlen


@dataclass
class IdentityEntries:
    enforce: dict[str, bool]
    entries: dict[EntryKey, Entry]

    @classmethod
    def from_kv(cls, value: Mapping[str, Any]) -> IdentityEntries:
        """A KV ``policy`` value, packed or in the older list form (:mod:`ciliate.policymap`)."""
        entries: dict[EntryKey, Entry] = {}
        for e in iter_entries(value):
            key = (e.peer, e.direction, e.proto, e.port, e.prefixlen)
            rules = L7Rules.from_entry({"l7": e.l7}) if e.l7 is not None else NO_L7
            entries[key] = Entry(e.deny, e.proxy_port, rules, e.cookies)
        enforce = {str(k): bool(v) for k, v in (value.get("enforce") or {}).items()}
        return cls(enforce, entries)

    def _lpm(self, peer: int, direction: str, proto: int, port: int) -> Entry | None:
        for plen in range(16, -1, -1):
            masked = port & ~((1 << (16 - plen)) - 1) & 0xFFFF if plen else 0
            found = self.entries.get((peer, direction, proto, masked, plen))
            if found is not None:
                return found
        return self.entries.get((peer, direction, 0, 0, 0))

    def lookup(self, peer: int, direction: str, proto: int, port: int) -> Entry | None:
        """The deciding entry (None: no enforcement or a default deny)."""
        if not self.enforce.get(direction, False):
            return None
        found = [e for e in (self._lpm(peer, direction, proto, port),
                             self._lpm(ANY_PEER, direction, proto, port) if peer else None)
                 if e is not None]
        if not found:
            return None
        for e in found:
            if e.deny:
                return e
        redirects = [e for e in found if e.proxy_port]
        return (redirects or found)[0]


@dataclass(frozen=True)
class Redirect:
    """One policy that sent this connection to the proxy."""

    direction: str  # "egress" (the source's policy) or "ingress" (the destination's)
    local_identity: int
    peer_identity: int
    proxy_port: int
    rules: L7Rules
    cookies: tuple[str, ...]


@dataclass(frozen=True)
class EndpointInfo:
    identity: int
    namespace: str = ""
    name: str = ""
    labels: tuple[str, ...] = ()
    endpoint_id: int = 0
    node: str = ""


@dataclass
class PolicyView:
    """The node's view of the KV buckets the proxy needs, updated by the service's watches."""

    node: str = ""
    policies: dict[int, IdentityEntries] = field(default_factory=dict)
    endpoints_by_ip: dict[str, EndpointInfo] = field(default_factory=dict)
    _endpoint_keys: dict[str, list[str]] = field(default_factory=dict)
    _ipcache_host: dict[str, int] = field(default_factory=dict)
    _ipcache_nets: dict[str, tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, int]] = field(
        default_factory=dict)
    _identity_labels: dict[int, tuple[str, ...]] = field(default_factory=dict)
    policy_listeners: list[Callable[[int], None]] = field(default_factory=list)
    """Called with the local identity after each policy change (the DNS proxy waits on it)."""

    # -- KV updates --------------------------------------------------------------------------

    def set_policy(self, key: str, value: Mapping[str, Any] | None) -> None:
        ident = int(key) if value is None else int(value.get("identity", key))
        if value is None:
            self.policies.pop(ident, None)
        else:
            self.policies[ident] = IdentityEntries.from_kv(value)
        for listener in self.policy_listeners:
            listener(ident)

    def has_peer(self, local: int, peer: int) -> bool:
        """Does ``local``'s policy hold any entry for ``peer`` (a learned FQDN identity)?"""
        pol = self.policies.get(local)
        return pol is not None and any(k[0] == peer for k in pol.entries)

    def set_endpoint(self, key: str, value: Mapping[str, Any] | None) -> None:
        for ip in self._endpoint_keys.pop(key, []):
            self.endpoints_by_ip.pop(ip, None)
        if value is None:
            return
        info = EndpointInfo(int(value.get("identity", 0)), str(value.get("namespace", "")),
                            str(value.get("name", "")), tuple(value.get("labels", ())),
                            int(value.get("id", 0)), str(value.get("node", "")))
        ips = [str(ip) for ip in value.get("ips", ())]
        for ip in ips:
            self.endpoints_by_ip[ip] = info
        self._endpoint_keys[key] = ips

    def set_ipcache(self, key: str, value: Mapping[str, Any] | None) -> None:
        self._ipcache_host.pop(key, None)
        self._ipcache_nets.pop(key, None)
        if value is None:
            return
        net = ipaddress.ip_network(str(value["prefix"]), strict=False)
        ident = int(value["identity"])
        if net.prefixlen == net.max_prefixlen:
            self._ipcache_host[key] = ident
            self._ipcache_host[str(net.network_address)] = ident
        else:
            self._ipcache_nets[key] = (net, ident)

    def set_identity(self, key: str, value: Mapping[str, Any] | None) -> None:
        if value is None:
            self._identity_labels.pop(int(key), None)
        else:
            self._identity_labels[int(value.get("id", key))] = tuple(value.get("labels", ()))

    # -- queries -----------------------------------------------------------------------------

    def identity_of(self, ip: str) -> int:
        ep = self.endpoints_by_ip.get(ip)
        if ep is not None:
            return ep.identity
        found = self._ipcache_host.get(ip)
        if found is not None:
            return found
        addr = ipaddress.ip_address(ip)
        best: tuple[int, int] | None = None
        for net, ident in self._ipcache_nets.values():
            if addr.version == net.version and addr in net and (
                best is None or net.prefixlen > best[0]
            ):
                    best = (net.prefixlen, ident)
        return best[1] if best else WORLD_IDENTITY

    def labels_of(self, identity: int) -> tuple[str, ...]:
        return self._identity_labels.get(identity, ())

    def local_endpoint(self, ip: str) -> EndpointInfo | None:
        ep = self.endpoints_by_ip.get(ip)
        if ep is None or (self.node and ep.node and ep.node != self.node):
            return None
        return ep

    def redirects(self, src_ip: str, dst_ip: str, proto: int, dport: int) -> list[Redirect]:
        """Every policy on this node that redirects src -> dst:dport to a proxy."""
        out: list[Redirect] = []
        src_ep, dst_ep = self.local_endpoint(src_ip), self.local_endpoint(dst_ip)
        if src_ep is not None:
            peer = self.identity_of(dst_ip)
            out += self._one(src_ep.identity, peer, "egress", proto, dport)
        if dst_ep is not None:
            peer = self.identity_of(src_ip)
            out += self._one(dst_ep.identity, peer, "ingress", proto, dport)
        return out

    def _one(self, local: int, peer: int, direction: str, proto: int, port: int) -> list[Redirect]:
        pol = self.policies.get(local)
        entry = pol.lookup(peer, direction, proto, port) if pol else None
        if entry is None or entry.deny or not entry.proxy_port:
            return []
        return [Redirect(direction, local, peer, entry.proxy_port, entry.rules, entry.cookies)]

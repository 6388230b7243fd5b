"""KV payloads (contracts: endpoints, ipcache, policy) -> desired map contents -> ordered writes.

Ordering is what keeps a packet from being judged against half-written state: ipcache entries
first (a policy may name a new identity), then policy entries, then endpoints (which switch
enforcement on); removals afterwards in the reverse order.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from ciliate.flows.tables import PolicyMatchType, TrafficDirection
from ciliate.policymap import Entry, iter_entries

from .model import (
    DIRECTION_BY_NAME,
    PORT_PROTOCOLS,
    EndpointFlag,
    EndpointValue,
    EnforcementMode,
    IPCacheKey,
    PolicyKey,
    PolicyValue,
    Proto,
)


class MapName(IntEnum):
    """Which map an op writes; the value is the order upserts are applied in."""

    IPCACHE = 0
    POLICY = 1
    ENDPOINTS = 2


@dataclass(frozen=True)
class MapOp:
    map: MapName
    key: Any
    value: Any | None  # None = delete

    @property
    def is_delete(self) -> bool:
        return self.value is None


@dataclass
class DesiredState:
    ipcache: dict[IPCacheKey, int] = field(default_factory=dict)
    endpoints: dict[str, EndpointValue] = field(default_factory=dict)  # pod IP -> value
    policy: dict[PolicyKey, PolicyValue] = field(default_factory=dict)


def parse_prefix(prefix: str) -> IPCacheKey:
    """'10.0.0.0/8' or '10.1.2.3' -> IPCacheKey; IPv6 is refused (the datapath is IPv4-only)."""
    net = ipaddress.ip_network(prefix, strict=False)
    if net.version != 4:
        raise ValueError(f"prefix {prefix!r}: only IPv4 is supported by this datapath")
    return IPCacheKey(str(net.network_address), net.prefixlen)


def ipcache_entries(payloads: Iterable[Mapping[str, Any]]) -> dict[IPCacheKey, int]:
    """KV ``ipcache`` values -> {prefix: identity}; IPv6 prefixes are skipped."""
    out: dict[IPCacheKey, int] = {}
    for p in payloads:
        try:
            key = parse_prefix(str(p["prefix"]))
        except ValueError:
            continue
        out[key] = int(p["identity"])
    return out


def match_type(peer: int, proto: int, port_prefixlen: int) -> PolicyMatchType:
    """How Cilium names what an entry matched on (policy-verdict ``policy_match_type``)."""
    l4 = proto != Proto.ANY
    if peer and l4:
        return PolicyMatchType.L3_L4
    if peer:
        return PolicyMatchType.L3_ONLY
    if l4:
        return PolicyMatchType.L4_ONLY
    return PolicyMatchType.ALL


def _expand_entry(local: int, e: Entry) -> list[tuple[PolicyKey, PolicyValue]]:
    direction = DIRECTION_BY_NAME[e.direction]
    proto, port, plen = e.proto, e.port, e.prefixlen
    if not 0 <= plen <= 16:
        raise ValueError(f"port_prefixlen {plen} out of range 0..16")
    if plen == 0:
        port = 0
    else:
        port &= (0xFFFF << (16 - plen)) & 0xFFFF
    protos: Iterable[int] = (proto,)
    if proto == Proto.ANY and plen > 0:
        protos = PORT_PROTOCOLS  # an LPM key cannot wildcard proto yet fix the port
    out = []
    for pr in protos:
        key = PolicyKey(local, direction, e.peer, pr, port if pr != Proto.ANY else 0,
                        plen if pr != Proto.ANY else 0)
        mt = match_type(e.peer, pr, key.port_prefixlen)
        out.append((key, PolicyValue(e.deny, e.proxy_port, mt)))
    return out


def _l4_covers(outer: PolicyKey, inner: PolicyKey) -> bool:
    """True when every packet ``inner`` matches is matched by ``outer`` (same peer assumed)."""
    if outer.proto == Proto.ANY:
        return True
    if outer.proto != inner.proto:
        return False
    return outer.port_prefixlen <= inner.port_prefixlen and outer.covers_port(inner.port)


def policy_entries(payload: Mapping[str, Any]) -> dict[PolicyKey, PolicyValue]:
    """One KV ``policy`` value (packed, or the older list form: :mod:`ciliate.policymap`)
    -> map entries.

    Deny wins over allow (Cilium). The BPF lookup takes the longest match per peer (the given
    identity, then 0 = any) and lets a deny from either lookup win; an allow that a same-peer
    deny covers would hide that deny behind a longer prefix, so it is dropped here.
    """
    local = int(payload["identity"])
    merged: dict[PolicyKey, PolicyValue] = {}
    for e in iter_entries(payload):
        for key, val in _expand_entry(local, e):
            old = merged.get(key)
            if old is None or (val.deny and not old.deny):
                merged[key] = val
    denies = [k for k, v in merged.items() if v.deny]
    return {
        k: v for k, v in merged.items()
        if v.deny or not any(
            d.peer == k.peer and d.direction == k.direction and _l4_covers(d, k) for d in denies
        )
    }


def endpoint_flags(
    enforce: Mapping[str, bool] | None, mode: EnforcementMode, audit: bool
) -> EndpointFlag:
    """Enforcement per direction as Cilium's modes decide it, plus the audit bit."""
    flags = EndpointFlag.NONE
    if mode is EnforcementMode.ALWAYS:
        flags = EndpointFlag.ENFORCE_INGRESS | EndpointFlag.ENFORCE_EGRESS
    elif mode is EnforcementMode.DEFAULT and enforce:
        if enforce.get("ingress"):
            flags |= EndpointFlag.ENFORCE_INGRESS
        if enforce.get("egress"):
            flags |= EndpointFlag.ENFORCE_EGRESS
    if audit:
        flags |= EndpointFlag.AUDIT
    return flags


def desired_state(
    *,
    node: str,
    endpoints: Iterable[Mapping[str, Any]],
    ipcache: Iterable[Mapping[str, Any]],
    policies: Mapping[int, Mapping[str, Any]],
    mode: EnforcementMode = EnforcementMode.DEFAULT,
    audit: bool = False,
) -> DesiredState:
    """Everything this node's maps should hold, from the current KV values.

    Only endpoints on ``node`` get endpoint and policy entries; ipcache is cluster-wide.
    In ``always`` mode an endpoint without a policy value still gets default deny.
    """
    state = DesiredState(ipcache=ipcache_entries(ipcache))
    local_identities: set[int] = set()
    for ep in endpoints:
        if ep.get("node") != node:
            continue
        ident = int(ep["identity"])
        pol = policies.get(ident)
        flags = endpoint_flags(pol.get("enforce") if pol else None, mode, audit)
        value = EndpointValue(int(ep["id"]), ident, flags)
        for ip in ep.get("ips", []):
            if ipaddress.ip_address(ip).version == 4:
                state.endpoints[str(ip)] = value
        local_identities.add(ident)
    for ident in sorted(local_identities):
        pol = policies.get(ident)
        if pol is not None:
            state.policy.update(policy_entries(pol))
    return state


def plan(current: DesiredState, desired: DesiredState) -> list[MapOp]:
    """Ordered writes turning ``current`` into ``desired``: upserts in MapName order, then
    deletes in reverse order."""
    upserts: list[MapOp] = []
    deletes: list[MapOp] = []
    pairs: list[tuple[MapName, Mapping[Any, Any], Mapping[Any, Any]]] = [
        (MapName.IPCACHE, current.ipcache, desired.ipcache),
        (MapName.POLICY, current.policy, desired.policy),
        (MapName.ENDPOINTS, current.endpoints, desired.endpoints),
    ]
    for name, cur, want in pairs:
        upserts.extend(MapOp(name, k, v) for k, v in sorted(want.items(), key=_sort_key)
                       if cur.get(k) != v)
    for name, cur, want in reversed(pairs):
        deletes.extend(MapOp(name, k, None) for k in sorted(cur, key=_key_order) if k not in want)
    return upserts + deletes


def _key_order(k: Any) -> Any:
    return (str(type(k)), k)


def _sort_key(item: tuple[Any, Any]) -> Any:
    return _key_order(item[0])


def lookup_verdict(
    entries: Mapping[PolicyKey, PolicyValue],
    local: int,
    direction: TrafficDirection,
    peer: int,
    proto: int,
    port: int,
) -> PolicyValue | None:
    """What the BPF program decides: longest match for the peer and for 0, deny from either wins.

    A reference for tests and for ``ciliate bpf policy get``-style explanations.
    """
    found: list[PolicyValue] = []
    for p in (peer, 0):
        best: tuple[int, PolicyValue] | None = None
        for k, v in entries.items():
            if (k.local_identity, k.direction, k.peer) != (local, direction, p):
                continue
            if k.proto not in (Proto.ANY, proto) or not k.covers_port(port):
                continue
            if best is None or k.lpm_prefixlen > best[0]:
                best = (k.lpm_prefixlen, v)
        if best is not None:
            found.append(best[1])
        if p == 0:
            break
    for v in found:
        if v.deny:
            return v
    return found[0] if found else None

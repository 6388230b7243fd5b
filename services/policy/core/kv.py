"""The KV ``policy`` value, as the datapath reads it (layout: :mod:`ciliate.policymap`)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from ciliate.policymap import (
    DIRECTION_CODES,
    CookieRow,
    Flag,
    Key,
    build_value,
    iter_entries,
    splice_peer,
)
from services.policy.core.compile import (
    DEFAULT_MAP_CAPACITY,
    EntryKey,
    EntryValue,
    IdentityPolicy,
    Overflow,
)
from services.policy.core.spec import Direction, DNSRule, HTTPRule


def encode_l7(value: EntryValue, rules: list[tuple[str, tuple[object, ...]]]) -> dict[str, Any]:
    """The L7 rules of a redirect entry, for the node's proxy: ``http`` rules (method, path,
    host, headers), ``dns`` rules (matchName / matchPattern, only when some rule has them);
    ``wildcard`` when another allow of the same key has no L7 rules (Cilium then lets every
    request through on that port)."""
    http: list[dict[str, Any]] = []
    dns: list[dict[str, Any]] = []
    for _cookie, items in rules:
        for h in items:
            if isinstance(h, HTTPRule):
                rule = {"method": h.method, "path": h.path, "host": h.host,
                        "headers": list(h.headers)}
                if rule not in http:
                    http.append(rule)
            elif isinstance(h, DNSRule):
                d = {"matchName": h.match_name} if h.match_name else {
                    "matchPattern": h.match_pattern}
                if d not in dns:
                    dns.append(d)
    l7_cookies = {cookie for cookie, _ in rules}
    out: dict[str, Any] = {"http": http, "wildcard": bool(value.cookies - l7_cookies)}
    if dns:
        out["dns"] = dns
    return out


def _rows(
    policy: IdentityPolicy, items: Iterable[tuple[EntryKey, EntryValue]]
) -> tuple[list[CookieRow], dict[Key, dict[str, Any]]]:
    """``items`` of ``policy`` as packed rows, and the L7 rules of their redirect keys."""
    codes = {d: DIRECTION_CODES[d.value] for d in Direction}
    cookie_tuples: dict[int, tuple[str, ...]] = {}  # values are shared between keys
    rows: list[CookieRow] = []
    append = rows.append
    l7: dict[Key, dict[str, Any]] = {}
    deny = Flag.DENY.value
    for k, v in items:
        cookies = cookie_tuples.get(id(v))
        if cookies is None:
            cookies = cookie_tuples[id(v)] = tuple(sorted(v.cookies))
        direction = codes[k.direction]
        append((k.peer, direction, k.proto, k.port, k.prefixlen, deny if v.deny else 0,
                v.proxy_port, cookies))
        if v.proxy_port and not v.deny:
            l7[(k.peer, direction, k.proto, k.port, k.prefixlen)] = encode_l7(
                v, policy.l7.get(k) or [])
    return rows, l7


def _enforce(policy: IdentityPolicy) -> dict[str, bool]:
    return {d.value: policy.enforce.get(d, False) for d in Direction}


def encode_policy(policy: IdentityPolicy, revision: int | None) -> dict[str, Any]:
    """The KV ``policy`` value of ``policy`` in the packed layout of :mod:`ciliate.policymap`
    (``revision`` None leaves the field out, for digests and the publisher)."""
    rows, l7 = _rows(policy, policy.entries.items())
    return build_value(policy.identity, _enforce(policy), rows, l7, revision)


def splice_policy(
    policy: IdentityPolicy, previous: Mapping[str, Any], peers: Iterable[int]
) -> dict[str, Any]:
    """The value :func:`encode_policy` gives for ``policy`` (without revision), made from
    ``previous`` (its value before the entries of ``peers`` changed) by replacing only those
    peers' records. Falls back to a whole encode when more than the peers' entries may differ
    (enforcement, identity, a value that is not packed or carries a revision)."""
    peers = set(peers)
    if (previous.get("identity") != policy.identity or "revision" in previous
            or previous.get("enforce") != _enforce(policy)
            or not isinstance(previous.get("entries"), bytes) or "overflow" in previous
            or not peers):
        return encode_policy(policy, None)
    value: dict[str, Any] = dict(previous)
    by_peer: dict[int, list[tuple[EntryKey, EntryValue]]] = {p: [] for p in peers}
    for k, v in policy.entries.items():
        if k.peer in by_peer:
            by_peer[k.peer].append((k, v))
    for peer in sorted(peers):
        rows, l7 = _rows(policy, by_peer[peer])
        value = splice_peer(value, peer, rows, l7)
    return value


def decode_policy(data: dict[str, Any]) -> IdentityPolicy:
    """A KV ``policy`` value (packed or the older list form) back to entries."""
    entries = {
        EntryKey(e.peer, Direction(e.direction), e.proto, e.port, e.prefixlen):
            EntryValue(e.deny, e.proxy_port, set(e.cookies))
        for e in iter_entries(data)
    }  # fmt: skip
    enforce = {d: bool(data["enforce"].get(d.value, False)) for d in Direction}
    return IdentityPolicy(int(data["identity"]), enforce, entries)


def check_capacity(policy: IdentityPolicy, capacity: int = DEFAULT_MAP_CAPACITY) -> Overflow | None:
    """None if the entries fit the map; else the refusal to report (never truncate)."""
    if len(policy.entries) > capacity:
        return Overflow(policy.identity, len(policy.entries), capacity)
    return None


def kv_key(identity: int) -> str:
    return str(identity)

"""The KV ``policy`` value, as the datapath reads it (see the shared contract)."""

from __future__ import annotations

from typing import Any

from services.policy.core.compile import (
    DEFAULT_MAP_CAPACITY,
    EntryKey,
    EntryValue,
    IdentityPolicy,
    Overflow,
)
from services.policy.core.spec import Direction, HTTPRule


def encode_l7(value: EntryValue, rules: list[tuple[str, tuple[object, ...]]]) -> dict[str, Any]:
    """The L7 rules of a redirect entry, for the node's proxy: ``http`` rules (method, path,
    host, headers); ``wildcard`` when another allow of the same key has no L7 rules (Cilium
    then lets every request through on that port)."""
    http: list[dict[str, Any]] = []
    for _cookie, items in rules:
        for h in items:
            if isinstance(h, HTTPRule):
                rule = {"method": h.method, "path": h.path, "host": h.host,
                        "headers": list(h.headers)}
                if rule not in http:
                    http.append(rule)
    l7_cookies = {cookie for cookie, _ in rules}
    return {"http": http, "wildcard": bool(value.cookies - l7_cookies)}


def encode_entry(
    key: EntryKey, value: EntryValue, l7: list[tuple[str, tuple[object, ...]]] | None = None
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "peer": key.peer,
        "direction": key.direction.value,
        "proto": key.proto,
        "port": key.port,
        "port_prefixlen": key.prefixlen,
        "deny": value.deny,
        "proxy_port": value.proxy_port,
        "cookies": sorted(value.cookies),
    }
    if value.proxy_port and not value.deny:
        out["l7"] = encode_l7(value, l7 or [])
    return out


def decode_entry(data: dict[str, Any]) -> tuple[EntryKey, EntryValue]:
    key = EntryKey(
        int(data["peer"]),
        Direction(data["direction"]),
        int(data["proto"]),
        int(data["port"]),
        int(data["port_prefixlen"]),
    )
    return key, EntryValue(bool(data["deny"]), int(data["proxy_port"]), set(data["cookies"]))


def encode_policy(policy: IdentityPolicy, revision: int) -> dict[str, Any]:
    return {
        "identity": policy.identity,
        "revision": revision,
        "enforce": {d.value: policy.enforce.get(d, False) for d in Direction},
        "entries": [
            encode_entry(k, v, policy.l7.get(k)) for k, v in sorted(policy.entries.items())
        ],
    }


def decode_policy(data: dict[str, Any]) -> IdentityPolicy:
    entries = dict(decode_entry(e) for e in data["entries"])
    enforce = {d: bool(data["enforce"].get(d.value, False)) for d in Direction}
    return IdentityPolicy(int(data["identity"]), enforce, entries)


def check_capacity(policy: IdentityPolicy, capacity: int = DEFAULT_MAP_CAPACITY) -> Overflow | None:
    """None if the entries fit the map; else the refusal to report (never truncate)."""
    if len(policy.entries) > capacity:
        return Overflow(policy.identity, len(policy.entries), capacity)
    return None


def kv_key(identity: int) -> str:
    return str(identity)

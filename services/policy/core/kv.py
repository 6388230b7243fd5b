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
from services.policy.core.spec import Direction


def encode_entry(key: EntryKey, value: EntryValue) -> dict[str, Any]:
    return {
        "peer": key.peer,
        "direction": key.direction.value,
        "proto": key.proto,
        "port": key.port,
        "port_prefixlen": key.prefixlen,
        "deny": value.deny,
        "proxy_port": value.proxy_port,
        "cookies": sorted(value.cookies),
    }


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
        "entries": [encode_entry(k, v) for k, v in sorted(policy.entries.items())],
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

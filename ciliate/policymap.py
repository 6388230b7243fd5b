"""The KV ``policy`` value: one identity's policy-map entries, packed (writer and readers share it).

The policy service writes these values and the datapath (BPF maps, L7 proxy) and the CLI read
them; they may not import one another, so the layout is defined here, once. Pure: no I/O.

A value is a msgpack map::

    {"identity": int, "revision": int, "enforce": {"ingress": bool, "egress": bool},
     "layout": 1,
     "entries": bytes,             # len(entries) // ENTRY.size records, sorted by key
     "cookies": [[str, ...], ...], # cookie sets; each record names one by index
     "l7": {index: {"http": [...], "wildcard": bool}}}   # only for redirect records with rules

Each record is ``ENTRY`` (little-endian, 16 bytes): peer identity (u32, 0 = any), direction
(u8, 0 = ingress, 1 = egress, as Cilium's policy key), protocol (u8, 0 = any), port (u16),
port prefix length (u8, 16 = exact port, 0 = any port, between = an aligned range block),
flags (u8, ``Flag``), proxy port (u16), cookie set index (u32).

Why: a whole map as msgpack dicts was ~160 KB for 1,300 entries (two thirds of it field names
and repeated cookie strings) and every watcher decoded each dict; packed it is 16 bytes an
entry, decoded with one ``numpy.frombuffer`` by the readers that need it.

Readers also accept the older form, ``"entries": [{"peer", "direction", "proto", "port",
"port_prefixlen", "deny", "proxy_port", "cookies", "l7"?}, ...]`` (tests and tools write it
by hand); :func:`iter_entries` yields the same rows for both.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence
from enum import IntFlag
from typing import Any, NamedTuple

import numpy as np

LAYOUT = 1
"""Version of the packed record layout; readers refuse values with another one."""

ENTRY = struct.Struct("<IBBHBBHI")
"""peer, direction, proto, port, prefixlen, flags, proxy_port, cookie set index."""

ENTRY_DTYPE = np.dtype([
    ("peer", "<u4"), ("direction", "u1"), ("proto", "u1"), ("port", "<u2"),
    ("prefixlen", "u1"), ("flags", "u1"), ("proxy_port", "<u2"), ("cookies", "<u4"),
])
"""``ENTRY`` as a numpy record (same bytes: no padding)."""

DIRECTIONS: tuple[str, str] = ("ingress", "egress")
"""Direction code -> name (the index is the code)."""
DIRECTION_CODES = {name: code for code, name in enumerate(DIRECTIONS)}

assert ENTRY_DTYPE.itemsize == ENTRY.size == 16


class Flag(IntFlag):
    NONE = 0
    DENY = 1
    L7 = 2  # the value carries L7 rules for this record under "l7"


class Entry(NamedTuple):
    """One policy-map entry as a reader sees it, whichever form the value came in."""

    peer: int
    direction: str
    proto: int
    port: int
    prefixlen: int
    deny: bool = False
    proxy_port: int = 0
    cookies: tuple[str, ...] = ()
    l7: Mapping[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        """The older dict form (CLI JSON output)."""
        out: dict[str, Any] = {
            "peer": self.peer, "direction": self.direction, "proto": self.proto,
            "port": self.port, "port_prefixlen": self.prefixlen, "deny": self.deny,
            "proxy_port": self.proxy_port, "cookies": list(self.cookies),
        }
        if self.l7 is not None:
            out["l7"] = dict(self.l7)
        return out


Row = tuple[int, int, int, int, int, int, int, int]
"""A packed record as a tuple, in ``ENTRY`` field order."""

CookieRow = tuple[int, int, int, int, int, int, int, tuple[str, ...]]
"""A record before packing: ``Row`` with the sorted cookie names in place of their index."""

Key = tuple[int, int, int, int, int]
"""(peer, direction code, proto, port, prefixlen): what makes a record unique."""


def pack_entries(rows: Iterable[Row]) -> bytes:
    """Rows (already in the order to publish) -> the ``entries`` bytes."""
    pack = ENTRY.pack
    return b"".join([pack(*row) for row in rows])


def unpack_entries(data: bytes) -> np.ndarray[Any, np.dtype[np.void]]:
    """The ``entries`` bytes -> a structured array (no copy); refuses a partial record."""
    if len(data) % ENTRY.size:
        raise ValueError(f"entries: {len(data)} bytes is not a whole number of "
                         f"{ENTRY.size}-byte records")
    return np.frombuffer(data, dtype=ENTRY_DTYPE)


def build_value(
    identity: int,
    enforce: Mapping[str, bool],
    rows: list[CookieRow],
    l7: Mapping[Key, Mapping[str, Any]] | None = None,
    revision: int | None = None,
) -> dict[str, Any]:
    """The KV value for ``rows`` (sorted here, in place, by key; cookie sets numbered in order
    of first use) and the L7 rules of redirect keys: equal maps always give equal bytes."""
    rows.sort()  # keys are unique, so the cookie tuples are never compared
    pack = ENTRY.pack
    cookie_index: dict[tuple[str, ...], int] = {}
    chunks: list[bytes] = []
    rules: dict[int, dict[str, Any]] = {}
    for i, (peer, direction, proto, port, plen, flags, proxy, cookies) in enumerate(rows):
        index = cookie_index.setdefault(cookies, len(cookie_index))
        if l7 is not None and not flags & Flag.DENY:
            rule = l7.get((peer, direction, proto, port, plen))
            if rule is not None:
                flags |= Flag.L7
                rules[i] = dict(rule)
        chunks.append(pack(peer, direction, proto, port, plen, flags, proxy, index))
    value: dict[str, Any] = {"identity": identity}
    if revision is not None:
        value["revision"] = revision
    value["enforce"] = {d: bool(enforce.get(d, False)) for d in DIRECTIONS}
    value["layout"] = LAYOUT
    value["entries"] = b"".join(chunks)
    value["cookies"] = [list(c) for c in cookie_index]
    if rules:
        value["l7"] = rules
    return value


def encode_value(
    identity: int,
    enforce: Mapping[str, bool],
    entries: Iterable[Entry],
    revision: int | None = None,
) -> dict[str, Any]:
    """The KV value for ``entries`` (tests and tools; the policy service builds rows itself)."""
    rows: list[CookieRow] = []
    l7: dict[Key, Mapping[str, Any]] = {}
    for e in entries:
        direction = DIRECTION_CODES[e.direction]
        rows.append((e.peer, direction, e.proto, e.port, e.prefixlen,
                     int(Flag.DENY) if e.deny else 0, e.proxy_port, tuple(sorted(e.cookies))))
        if e.l7 is not None:
            l7[(e.peer, direction, e.proto, e.port, e.prefixlen)] = e.l7
    return build_value(identity, enforce, rows, l7, revision)


def iter_entries(value: Mapping[str, Any]) -> Iterator[Entry]:
    """Every entry of a KV ``policy`` value, packed or in the older list form.

    Raises ValueError (or KeyError/TypeError for a malformed older entry) on a bad value.
    """
    raw = value.get("entries") or ()
    if isinstance(raw, bytes | bytearray | memoryview):
        yield from _iter_packed(value, bytes(raw))
        return
    for e in raw:
        port = int(e.get("port", 0))
        l7 = e.get("l7")
        yield Entry(int(e.get("peer", 0)), str(e["direction"]), int(e.get("proto", 0)), port,
                    int(e.get("port_prefixlen", 16 if port else 0)), bool(e.get("deny", False)),
                    int(e.get("proxy_port", 0)), tuple(e.get("cookies") or ()),
                    l7 if isinstance(l7, Mapping) else None)


def _iter_packed(value: Mapping[str, Any], data: bytes) -> Iterator[Entry]:
    layout = value.get("layout", LAYOUT)
    if layout != LAYOUT:
        raise ValueError(f"policy value layout {layout!r}; this reader knows {LAYOUT}")
    cookie_sets: Sequence[Sequence[str]] = value.get("cookies") or ()
    cookies = [tuple(c) for c in cookie_sets]
    l7: Mapping[Any, Any] = value.get("l7") or {}
    records = unpack_entries(data).tolist()
    for i, (peer, direction, proto, port, plen, flags, proxy, cidx) in enumerate(records):
        if direction >= len(DIRECTIONS):
            raise ValueError(f"entry {i}: direction code {direction}")
        if cidx >= len(cookies):
            raise ValueError(f"entry {i}: cookie set {cidx} of {len(cookies)}")
        rules = l7.get(i, l7.get(str(i))) if flags & Flag.L7 else None
        yield Entry(peer, DIRECTIONS[direction], proto, port, plen, bool(flags & Flag.DENY),
                    proxy, cookies[cidx], rules if isinstance(rules, Mapping) else None)


def entry_count(value: Mapping[str, Any]) -> int:
    """Number of entries without decoding them."""
    raw = value.get("entries") or ()
    if isinstance(raw, bytes | bytearray | memoryview):
        return len(raw) // ENTRY.size
    return len(raw)


def readable(value: Mapping[str, Any]) -> dict[str, Any]:
    """The value with ``entries`` as a list of dicts (for JSON output and people)."""
    out = {k: v for k, v in value.items() if k not in ("entries", "cookies", "l7", "layout")}
    out["entries"] = [e.as_dict() for e in iter_entries(value)]
    return out


def splice_peer(
    value: Mapping[str, Any],
    peer: int,
    rows: list[CookieRow],
    l7: Mapping[Key, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """``value`` (packed, as :func:`build_value` wrote it) with every record of ``peer``
    replaced by ``rows`` (all with that peer; sorted here, in place): the bytes
    :func:`build_value` would give for the whole new map, without re-encoding the other records.

    Records are sorted by key and the peer leads the key, so one peer's records are one run:
    the run is cut out and the new one put in its place; cookie sets are renumbered in order of
    first use and unused ones dropped, and the ``l7`` indexes after the run are shifted, as a
    whole encode would do. A new peer identity changes ~400 maps by a few records each: this
    is what publishing them costs instead of encoding ~1,300 records per map.
    """
    data = value.get("entries") or b""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ValueError("splice_peer needs a packed value")
    if value.get("layout", LAYOUT) != LAYOUT:
        raise ValueError(f"policy value layout {value.get('layout')!r}")
    old = unpack_entries(bytes(data))
    peers = old["peer"]
    lo = int(np.searchsorted(peers, peer, "left"))
    hi = int(np.searchsorted(peers, peer, "right"))
    sets: list[tuple[str, ...]] = [tuple(c) for c in value.get("cookies") or ()]
    set_index = {c: i for i, c in enumerate(sets)}
    rows.sort()
    rules: dict[int, dict[str, Any]] = {}
    new = np.empty(len(rows), dtype=ENTRY_DTYPE)
    for i, (p, direction, proto, port, plen, flags, proxy, cookies) in enumerate(rows):
        if p != peer:
            raise ValueError(f"splice_peer({peer}): a row for peer {p}")
        index = set_index.get(cookies)
        if index is None:
            index = set_index[cookies] = len(sets)
            sets.append(cookies)
        if l7 is not None and not flags & Flag.DENY:
            rule = l7.get((p, direction, proto, port, plen))
            if rule is not None:
                flags |= Flag.L7
                rules[lo + i] = dict(rule)
        new[i] = (p, direction, proto, port, plen, flags, proxy, index)
    merged = np.concatenate((old[:lo], new, old[hi:]))
    column = merged["cookies"]
    used, first = np.unique(column, return_index=True)
    order = used[np.argsort(first, kind="stable")]  # cookie sets in order of first use
    renumber = np.zeros(len(sets), dtype=np.uint32)
    renumber[order] = np.arange(len(order), dtype=np.uint32)
    merged["cookies"] = renumber[column]
    shift = len(rows) - (hi - lo)
    for index, rule in (value.get("l7") or {}).items():
        i = int(index)
        if i < lo:
            rules[i] = rule
        elif i >= hi:
            rules[i + shift] = rule
    out: dict[str, Any] = {k: v for k, v in value.items()
                           if k not in ("entries", "cookies", "l7")}
    out["entries"] = merged.tobytes()
    out["cookies"] = [list(sets[i]) for i in order.tolist()]
    if rules:
        out["l7"] = dict(sorted(rules.items()))
    return out

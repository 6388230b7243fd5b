"""The LB maps' entries as frozen data, and the translation of KV `lb` values into them.

Layouts follow Cilium's `lb4_*` maps: a services map keyed by (frontend address, port, protocol,
scope, backend slot) where slot 0 is the service ("master") entry and slots 1..count hold the
backend ids for random selection; a backends map by id; a reverse-NAT map by rev-NAT index
(the frontend id); Maglev tables in an outer map keyed by table id; and ClientIP affinity in
an LRU map the programs fill. The C structs in ``bpf/lb.c`` mirror these (``maps.py`` holds the
ctypes twins).
"""

from __future__ import annotations

import hashlib
import ipaddress
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import IntEnum, IntFlag
from typing import Any

PROTO_NUMBERS = {"TCP": 6, "UDP": 17, "SCTP": 132}
PROTO_NAMES = {v: k for k, v in PROTO_NUMBERS.items()}
ANY_ADDRESS = "0.0.0.0"


class SvcFlag(IntFlag):
    """Service flags (Cilium's ``SVC_FLAG_*`` subset) carried in the master entry."""

    NODEPORT = 0x01
    EXTERNAL_IP = 0x02
    LOADBALANCER = 0x04
    AFFINITY = 0x08
    LOCAL_SCOPE = 0x10
    MAGLEV = 0x20
    CLUSTER_IP = 0x40


FRONTEND_TYPE_FLAGS = {
    "ClusterIP": SvcFlag.CLUSTER_IP,
    "NodePort": SvcFlag.NODEPORT,
    "LoadBalancer": SvcFlag.LOADBALANCER,
    "ExternalIPs": SvcFlag.EXTERNAL_IP,
}


class BackendState(IntEnum):
    """Cilium's backend state numbers (``pkg/loadbalancer``: active 0, terminating 1, ...)."""

    ACTIVE = 0
    TERMINATING = 1
    QUARANTINED = 2
    MAINTENANCE = 3


BACKEND_STATES = {s.name.lower(): s for s in BackendState}


class BackendFlag(IntFlag):
    NONE = 0
    REMOTE = 0x01
    """The backend runs on another node: the tc path SNATs to the node address."""


@dataclass(frozen=True, order=True)
class SvcKey:
    address: str
    port: int
    proto: int
    slot: int = 0
    scope: int = 0


@dataclass(frozen=True)
class SvcValue:
    """Master (slot 0): count of selectable backends, flags, affinity timeout, Maglev table.
    Slot n: ``backend_id`` only (the rest copied from the master, as Cilium does)."""

    backend_id: int
    count: int
    rev_nat: int
    flags: SvcFlag
    affinity_timeout: int = 0
    table_id: int = 0


@dataclass(frozen=True)
class BackendValue:
    address: str
    port: int
    proto: int
    state: BackendState = BackendState.ACTIVE
    flags: BackendFlag = BackendFlag.NONE


@dataclass(frozen=True)
class RevNatValue:
    address: str
    port: int


@dataclass
class LbState:
    """Everything the LB maps hold for one node (affinity and conntrack are the programs')."""

    services: dict[SvcKey, SvcValue] = field(default_factory=dict)
    backends: dict[int, BackendValue] = field(default_factory=dict)
    revnat: dict[int, RevNatValue] = field(default_factory=dict)
    maglev: dict[int, bytes] = field(default_factory=dict)
    """Table id -> the table as M little-endian uint32 backend ids."""


def table_id(table_key: str) -> int:
    """A table's id in the outer Maglev map: 64 bits of a hash of its KV key (the key itself
    hashes the table's content), so every agent and every restart agrees without allocation."""
    return int.from_bytes(hashlib.sha256(table_key.encode()).digest()[:8], "little") or 1


def table_backend_ids(table: bytes) -> list[int]:
    n = len(table) // 4
    return list(struct.unpack(f"<{n}I", table[: n * 4]))


class LbInputError(ValueError):
    """A KV `lb` value this datapath cannot load (names the key and field)."""


def desired_state(
    lb_kv: Mapping[str, Mapping[str, Any]], node: str, *, maglev_m: int | None = None,
) -> tuple[LbState, list[str]]:
    """Map contents for ``node`` from the whole KV `lb` content; plus warnings for entries
    skipped (a Maglev table of another size than the programs were compiled for, ...).

    Per frontend: the backends of its port name; a ``local`` frontend only those on ``node``.
    Selectable for new connections: Maglev = the table's members; random = active backends
    with weight > 0, else the terminating ones (Cilium's fallback). Every listed backend goes
    into the backends map so established flows to terminating ones keep working.
    """
    state = LbState()
    warnings: list[str] = []
    tables = {k: v for k, v in lb_kv.items() if k.startswith("tbl.")}
    for key in sorted(lb_kv):
        if not key.startswith("svc."):
            continue
        svc = lb_kv[key]
        try:
            _add_service(state, warnings, key, svc, tables, node, maglev_m)
        except (KeyError, TypeError, ValueError) as e:
            warnings.append(f"{key}: skipped ({e!r})")
    return state, warnings


def _add_service(
    state: LbState, warnings: list[str], key: str, svc: Mapping[str, Any],
    tables: Mapping[str, Mapping[str, Any]], node: str, maglev_m: int | None,
) -> None:
    maglev = svc.get("algorithm", "maglev") == "maglev"
    affinity = int(svc.get("affinity_timeout", 0) or 0)
    by_port: dict[str, list[tuple[int, BackendValue, int]]] = {}
    for b in svc.get("backends", []):
        proto = PROTO_NUMBERS[b["protocol"]]
        bval = BackendValue(
            address=str(ipaddress.IPv4Address(b["address"])), port=int(b["port"]), proto=proto,
            state=BACKEND_STATES[b.get("state", "active")],
            flags=BackendFlag.REMOTE if b.get("node") not in (None, "", node) else BackendFlag.NONE,
        )
        bid = int(b["id"])
        state.backends[bid] = bval
        by_port.setdefault(b.get("port_name", ""), []).append(
            (bid, bval, int(b.get("weight", 100))))
    for fe in svc.get("frontends", []):
        port_name = fe.get("port_name", "")
        local = fe.get("scope") == "local"
        members = [m for m in by_port.get(port_name, [])
                   if not local or not (m[1].flags & BackendFlag.REMOTE)]
        flags = FRONTEND_TYPE_FLAGS[fe["type"]]
        if affinity:
            flags |= SvcFlag.AFFINITY
        if local:
            flags |= SvcFlag.LOCAL_SCOPE
        tid = 0
        active = [m for m in members if m[1].state is BackendState.ACTIVE and m[2] > 0]
        if maglev:
            tkey = (svc.get("local_tables", {}).get(port_name, {}).get(node) if local
                    else svc.get("tables", {}).get(port_name))
            tbl = tables.get(tkey) if tkey is not None else None
            if tkey is None:
                selectable = []  # the lb's contract: a null table means no backend
            elif tbl is None or (maglev_m is not None and int(tbl["m"]) != maglev_m):
                warnings.append(f"{key}: table {tkey} missing or of another size than "
                                f"M={maglev_m}; random selection instead")
                selectable = active
            else:
                tid = table_id(tkey)
                state.maglev[tid] = bytes(tbl["table"])
                flags |= SvcFlag.MAGLEV
                selectable = active
        else:
            # Cilium's fallback: terminating backends when nothing is active.
            selectable = active or [m for m in members
                                    if m[1].state is BackendState.TERMINATING]
        address = str(ipaddress.IPv4Address(fe["address"]))
        proto = PROTO_NUMBERS[fe["protocol"]]
        rev = int(fe["id"])
        state.revnat[rev] = RevNatValue(address, int(fe["port"]))
        master = SvcKey(address, int(fe["port"]), proto)
        state.services[master] = SvcValue(0, len(selectable), rev, flags, affinity, tid)
        for slot, (bid, _bval, _w) in enumerate(sorted(selectable), start=1):
            state.services[SvcKey(address, int(fe["port"]), proto, slot)] = SvcValue(
                bid, 0, rev, flags, affinity, tid)


# --- the ordered diff ------------------------------------------------------------------------


class LbMap(IntEnum):
    """The maps in the order puts are applied (deletes go in reverse)."""

    BACKENDS = 0
    MAGLEV = 1
    REVNAT = 2
    SERVICES = 3


@dataclass(frozen=True)
class LbOp:
    map: LbMap
    key: Any
    value: Any  # None = delete


def _dict_ops(m: LbMap, cur: Mapping[Any, Any], want: Mapping[Any, Any],
              same: Any = None) -> tuple[list[LbOp], list[LbOp]]:
    eq = same or (lambda a, b: a == b)
    puts = [LbOp(m, k, v) for k, v in want.items() if k not in cur or not eq(cur[k], v)]
    dels = [LbOp(m, k, None) for k in cur if k not in want]
    return puts, dels


def plan(current: LbState, desired: LbState) -> list[LbOp]:
    """The writes that turn ``current`` into ``desired``, in a safe order.

    Puts: backends, Maglev tables, reverse NAT, backend slots, then service master entries (so a
    master never counts a slot or names a table or backend that is not there yet). Deletes
    after all puts: masters, slots, reverse NAT, tables, backends last (a backend leaves only
    when nothing can select it; connections to other backends never notice). Maglev tables are
    compared by id only: an id names immutable content.
    """
    b_put, b_del = _dict_ops(LbMap.BACKENDS, current.backends, desired.backends)
    m_put, m_del = _dict_ops(LbMap.MAGLEV, current.maglev, desired.maglev, lambda a, b: True)
    r_put, r_del = _dict_ops(LbMap.REVNAT, current.revnat, desired.revnat)
    s_put, s_del = _dict_ops(LbMap.SERVICES, current.services, desired.services)
    slots_put = sorted((o for o in s_put if o.key.slot), key=lambda o: o.key)
    masters_put = sorted((o for o in s_put if not o.key.slot), key=lambda o: o.key)
    masters_del = sorted((o for o in s_del if not o.key.slot), key=lambda o: o.key)
    slots_del = sorted((o for o in s_del if o.key.slot), key=lambda o: o.key, reverse=True)
    return [*b_put, *m_put, *r_put, *slots_put, *masters_put,
            *masters_del, *slots_del, *r_del, *m_del, *b_del]


def apply_ops(state: LbState, ops: Iterable[LbOp]) -> LbState:
    """What the maps hold after ``ops`` (the model the property tests check plans against)."""
    out = LbState(dict(state.services), dict(state.backends), dict(state.revnat),
                  dict(state.maglev))
    target: dict[LbMap, dict[Any, Any]] = {
        LbMap.SERVICES: out.services, LbMap.BACKENDS: out.backends, LbMap.REVNAT: out.revnat,
        LbMap.MAGLEV: out.maglev,
    }
    for op in ops:
        d = target[op.map]
        if op.value is None:
            d.pop(op.key, None)
        else:
            d[op.key] = op.value
    return out


def dangling(state: LbState) -> list[str]:
    """References the programs could follow to nothing: a master counting a missing slot, a
    slot naming a missing backend, a master naming a missing table or reverse-NAT entry.
    Empty after every single op of a plan (what "no blip" means for the maps)."""
    bad: list[str] = []
    for k, v in state.services.items():
        if k.slot:
            if v.backend_id not in state.backends:
                bad.append(f"slot {k} -> backend {v.backend_id}")
            continue
        if v.rev_nat not in state.revnat:
            bad.append(f"{k} -> revnat {v.rev_nat}")
        if v.table_id and v.table_id not in state.maglev:
            bad.append(f"{k} -> table {v.table_id}")
        if v.table_id and v.table_id in state.maglev:
            bad.extend(f"{k} table -> backend {b}" for b in
                       set(table_backend_ids(state.maglev[v.table_id])) - set(state.backends))
        for slot in range(1, v.count + 1):
            if SvcKey(k.address, k.port, k.proto, slot, k.scope) not in state.services:
                bad.append(f"{k} -> missing slot {slot}")
    return bad


# --- incremental: one KV key at a time -------------------------------------------------------


class LbIndex:
    """The merged desired state kept per Service fragment, so one KV event costs one Service's
    work (not a rebuild of every Service): ``update(key, value)`` returns the ordered ops.

    Entries shared between Services (a backend id, a Maglev table) are reference-counted and
    leave the maps only with their last user.
    """

    def __init__(self, node: str, maglev_m: int | None = None) -> None:
        self.node = node
        self.maglev_m = maglev_m
        self.state = LbState()
        self.tables: dict[str, dict[str, Any]] = {}
        self.services: dict[str, Mapping[str, Any]] = {}
        self.fragments: dict[str, LbState] = {}
        self.users: dict[str, set[str]] = {}  # table key -> svc keys
        self.uses: dict[str, set[str]] = {}  # svc key -> table keys (users, reversed)
        self.refs: dict[tuple[LbMap, Any], int] = {}
        self.warnings: dict[str, list[str]] = {}

    def load(self, lb_kv: Mapping[str, Mapping[str, Any]]) -> None:
        """Start from a whole bucket (no ops: pair with ``plan(maps, self.state)``)."""
        for k, v in lb_kv.items():
            if k.startswith("tbl."):
                self.tables[k] = dict(v)
        for k, v in lb_kv.items():
            if k.startswith("svc."):
                self._set_service(k, v)

    def update(self, key: str, value: Mapping[str, Any] | None) -> list[LbOp]:
        touched: set[str] = set()
        if key.startswith("tbl."):
            if value is None:
                # The lb deletes a table once no Service points at it; a Service that still
                # does keeps its copy until its own update (re-deriving it now from its
                # possibly stale value could roll back a backend another Service updated).
                self.tables.pop(key, None)
                return []
            if self.tables.get(key) == value:
                return []  # the same content again (keys hash it): nothing to re-derive
            self.tables[key] = dict(value)
            touched = set(self.users.get(key, ()))
        elif key.startswith("svc."):
            touched = {key}
            if value is None:
                self.services.pop(key, None)
        before = _restrict(self.state, self._keys_of(touched))
        for sk in touched:
            v = value if sk == key else self.services.get(sk)
            if v is None and sk == key and key.startswith("svc."):
                self._drop_service(sk)
            elif v is not None:
                self._set_service(sk, v)
        after_keys = self._keys_of(touched) | _all_keys(before)
        return plan(before, _restrict(self.state, after_keys))

    def _keys_of(self, svc_keys: Iterable[str]) -> set[tuple[LbMap, Any]]:
        out: set[tuple[LbMap, Any]] = set()
        for sk in svc_keys:
            frag = self.fragments.get(sk)
            if frag is not None:
                out |= _all_keys(frag)
        return out

    def _set_service(self, key: str, value: Mapping[str, Any]) -> None:
        self._drop_service(key)
        self.services[key] = value
        refs: set[str] = {t for t in value.get("tables", {}).values() if t}
        for per_node in value.get("local_tables", {}).values():
            refs |= {t for t in per_node.values() if t}
        tables = {t: self.tables[t] for t in refs if t in self.tables}
        frag, warnings = desired_state({key: value, **tables}, self.node, maglev_m=self.maglev_m)
        for t in refs:
            self.users.setdefault(t, set()).add(key)
        self.uses[key] = refs
        self.fragments[key] = frag
        self.warnings[key] = warnings
        for (m, k), v in _entries(frag):
            self.refs[(m, k)] = self.refs.get((m, k), 0) + 1
            _target(self.state, m)[k] = v

    def _drop_service(self, key: str) -> None:
        frag = self.fragments.pop(key, None)
        self.warnings.pop(key, None)
        for t in self.uses.pop(key, ()):  # not a scan of every table: O(this Service)
            users = self.users.get(t)
            if users is not None:
                users.discard(key)
                if not users:
                    del self.users[t]
        if frag is None:
            return
        for (m, k), _v in _entries(frag):
            n = self.refs.get((m, k), 0) - 1
            if n <= 0:
                self.refs.pop((m, k), None)
                _target(self.state, m).pop(k, None)
            else:
                self.refs[(m, k)] = n


def _target(state: LbState, m: LbMap) -> dict[Any, Any]:
    if m is LbMap.SERVICES:
        return state.services
    if m is LbMap.BACKENDS:
        return state.backends
    if m is LbMap.REVNAT:
        return state.revnat
    return state.maglev


def _entries(state: LbState) -> Iterable[tuple[tuple[LbMap, Any], Any]]:
    for m in LbMap:
        for k, v in _target(state, m).items():
            yield (m, k), v


def _all_keys(state: LbState) -> set[tuple[LbMap, Any]]:
    return {mk for mk, _v in _entries(state)}


def _restrict(state: LbState, keys: set[tuple[LbMap, Any]]) -> LbState:
    out = LbState()
    for m, k in keys:
        src = _target(state, m)
        if k in src:
            _target(out, m)[k] = src[k]
    return out

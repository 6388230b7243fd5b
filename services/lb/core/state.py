"""The load balancer's desired state, kept incrementally, and the ``lb`` KV writes it implies.

Inputs (Services, EndpointSlices, pod endpoint records, operator backend states) mark the
Services they touch dirty; :meth:`LbState.render` turns the dirty ones into KV puts and
deletes. Maglev tables are keyed by a hash of their members (ids, hash keys, weights, size,
seed): every Service port with the same backend set shares one ``tbl.<hash>`` entry, built
once; a backend change builds only the tables whose member set it changes, and a table
nobody references any more is deleted. Bursts coalesce because rendering handles whatever
accumulated since the last call.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ciliate.resources.core import EndpointSlice, LbAlgorithm, Service
from services.lb.core.derive import (
    EndpointRecord,
    apply_overrides,
    backends_from_endpoints,
    backends_from_slices,
    frontends,
    has_frontends,
    pod_selected,
    selects,
    table_members,
)
from services.lb.core.maglev import (
    DEFAULT_HASH_SEED,
    DEFAULT_TABLE_SIZE,
    MaglevBackend,
    Table,
    backend_hash_key,
    build_table,
    murmur_seed,
    table_bytes,
)
from services.lb.core.model import (
    TABLE_PREFIX,
    Backend,
    BackendState,
    Frontend,
    L3n4,
    Scope,
    service_key,
)

Ref = tuple[str, str]
"""(namespace, name) of a Service or an EndpointSlice."""

TableBuilder = Callable[[Sequence[MaglevBackend], int, int], Table]


def _default_builder(backends: Sequence[MaglevBackend], m: int, seed: int) -> Table:
    return build_table(backends, m, seed)


@dataclass(frozen=True)
class Resolved:
    """One Service's frontends and backends, before ids are attached."""

    ref: Ref
    service: Service
    frontends: tuple[Frontend, ...]
    backends: tuple[Backend, ...]
    group: tuple[Any, ...]
    """Identifies the backend half: Services with equal groups share its rendering."""

    def addresses(self) -> set[L3n4]:
        return {b.l3n4 for b in self.backends}


@dataclass
class Changes:
    """KV writes for the ``lb`` bucket: values to put and keys to delete."""

    puts: dict[str, Any] = field(default_factory=dict)
    deletes: set[str] = field(default_factory=set)

    def __bool__(self) -> bool:
        return bool(self.puts or self.deletes)


@dataclass(frozen=True)
class TableEntry:
    key: str
    m: int
    backend_ids: tuple[int, ...]
    table: bytes

    def kv_value(self) -> dict[str, Any]:
        return {"m": self.m, "backend_ids": list(self.backend_ids), "table": self.table}


def algorithm_of(service: Service, default: LbAlgorithm) -> LbAlgorithm:
    return service.lb_algorithm or default


def affinity_timeout(service: Service) -> int:
    """Seconds of ClientIP affinity (0: none); Kubernetes' default is 10800."""
    if service.spec.sessionAffinity != "ClientIP":
        return 0
    config = service.spec.sessionAffinityConfig
    return config.clientIP.timeoutSeconds if config is not None else 10800


class LbState:
    def __init__(
        self,
        table_size: int = DEFAULT_TABLE_SIZE,
        seed: str = DEFAULT_HASH_SEED,
        default_algorithm: LbAlgorithm = LbAlgorithm.MAGLEV,
        builder: TableBuilder = _default_builder,
    ) -> None:
        self.table_size = table_size
        self.seed = murmur_seed(seed)
        self.default_algorithm = default_algorithm
        self.builder = builder
        self.services: dict[Ref, Service] = {}
        self.selecting: dict[str, set[Ref]] = {}
        """Namespace -> Services with a selector there (who a pod change may touch)."""
        self.slices: dict[Ref, EndpointSlice] = {}
        self.slices_of: dict[Ref, set[Ref]] = {}
        self.slice_generation: dict[Ref, int] = {}
        self.endpoints: dict[str, dict[str, EndpointRecord]] = {}
        """Namespace -> KV key -> endpoint record."""
        self.namespace_generation: dict[str, int] = {}
        self.overrides: dict[L3n4, BackendState] = {}
        self.dirty: set[Ref] = set()
        self.tables: dict[str, TableEntry] = {}
        self.table_users: dict[str, set[Ref]] = {}
        self.service_tables: dict[Ref, set[str]] = {}
        self.published: dict[Ref, dict[str, Any]] = {}
        self.resolved: dict[Ref, Resolved] = {}
        self.builds = 0
        """Maglev tables built so far (tests and metrics)."""
        self._group_cache: dict[tuple[Any, ...], tuple[Backend, ...]] = {}
        self._frontends: dict[Ref, tuple[Service, tuple[Frontend, ...], tuple[Any, ...]]] = {}
        self._frontend_values: dict[Ref, tuple[tuple[Frontend, ...], list[dict[str, Any]]]] = {}
        self._halves: dict[Ref, dict[str, Any]] = {}
        self._published_service: dict[Ref, Service] = {}
        self._render_cache: dict[tuple[Any, ...], dict[str, Any]] = {}
        self._key_cache: dict[tuple[tuple[str, int, int], ...], str] = {}

    # --- inputs ------------------------------------------------------------------------

    def set_service(self, service: Service) -> None:
        ref = (service.metadata.namespace or "default", service.metadata.name)
        old = self.services.get(ref)
        if old is not None and old == service:
            return
        self._forget_selector(ref)
        self.services[ref] = service
        if selects(service):
            self.selecting.setdefault(ref[0], set()).add(ref)
        self.dirty.add(ref)

    def delete_service(self, namespace: str, name: str) -> None:
        ref = (namespace, name)
        if self.services.pop(ref, None) is not None:
            self._forget_selector(ref)
            self.dirty.add(ref)

    def _forget_selector(self, ref: Ref) -> None:
        users = self.selecting.get(ref[0])
        if users is not None:
            users.discard(ref)

    def set_slice(self, es: EndpointSlice) -> None:
        ref = (es.metadata.namespace or "default", es.metadata.name)
        old = self.slices.get(ref)
        if old is not None and old == es:
            return
        self.delete_slice(*ref)
        self.slices[ref] = es
        if es.service_name:
            owner = (ref[0], es.service_name)
            self.slices_of.setdefault(owner, set()).add(ref)
            self.slice_generation[owner] = self.slice_generation.get(owner, 0) + 1
            self.dirty.add(owner)

    def delete_slice(self, namespace: str, name: str) -> None:
        ref = (namespace, name)
        es = self.slices.pop(ref, None)
        if es is None or not es.service_name:
            return
        owner = (namespace, es.service_name)
        self.slices_of.get(owner, set()).discard(ref)
        if not self.slices_of.get(owner):
            self.slices_of.pop(owner, None)
        self.slice_generation[owner] = self.slice_generation.get(owner, 0) + 1
        self.dirty.add(owner)

    def set_endpoint(self, key: str, record: EndpointRecord | None) -> None:
        """A KV ``endpoints`` put (``record``) or delete (None)."""
        old = None
        for records in self.endpoints.values():
            if key in records:
                old = records[key]
                break
        if old == record:
            return
        touched = [r for r in (old, record) if r is not None]
        if old is not None:
            self.endpoints[str(old.get("namespace"))].pop(key, None)
        if record is not None:
            self.endpoints.setdefault(str(record.get("namespace")), {})[key] = record
        for rec in touched:
            namespace = str(rec.get("namespace"))
            self.namespace_generation[namespace] = self.namespace_generation.get(namespace, 0) + 1
            for ref in self.selecting.get(namespace, ()):
                if ref not in self.slices_of and pod_selected(self.services[ref], rec):
                    self.dirty.add(ref)

    def set_override(self, backend: L3n4, state: BackendState | None) -> None:
        """An operator's backend state (quarantined, maintenance); None or active clears it."""
        if state in (None, BackendState.ACTIVE):
            changed = self.overrides.pop(backend, None) is not None
        else:
            assert state is not None
            changed = self.overrides.get(backend) != state
            self.overrides[backend] = state
        if changed:
            self._render_cache.clear()
            self.dirty |= {ref for ref, r in self.resolved.items()
                           if any(b.l3n4 == backend for b in r.backends)}

    # --- resolution --------------------------------------------------------------------

    def resolve(self, ref: Ref) -> Resolved | None:
        """Frontends and backends of one Service (None: absent or without frontends)."""
        service = self.services.get(ref)
        if service is None or not has_frontends(service):
            return None
        cached = self._frontends.get(ref)
        if cached is None or cached[0] is not service:
            cached = (service, tuple(frontends(service)),
                      tuple((p.name, p.protocol, p.target) for p in service.spec.ports))
            self._frontends[ref] = cached
        ports = cached[2]
        group: tuple[Any, ...]
        if ref in self.slices_of:
            group = ("slices", ref, ports, self.slice_generation.get(ref, 0))
            found = self._group_cache.get(group)
            if found is None:
                found = tuple(backends_from_slices(
                    service, [self.slices[s] for s in sorted(self.slices_of[ref])]))
        elif selects(service):
            selector = tuple(sorted((service.spec.selector or {}).items()))
            group = ("pods", ref[0], selector, ports, self.namespace_generation.get(ref[0], 0))
            found = self._group_cache.get(group)
            if found is None:
                found = tuple(backends_from_endpoints(
                    service, self.endpoints.get(ref[0], {}).values()))
        else:
            group = ("none", ports)
            found = ()
        self._group_cache[group] = found
        backends = tuple(apply_overrides(found, self.overrides)) if self.overrides else found
        return Resolved(ref, service, cached[1], backends, group)

    def take_dirty(self) -> list[tuple[Ref, Resolved | None]]:
        """The Services changed since the last call, resolved; clears the dirty set."""
        dirty, self.dirty = sorted(self.dirty), set()
        self._group_cache = {}
        return [(ref, self.resolve(ref)) for ref in dirty]

    # --- rendering -----------------------------------------------------------------------

    def table_key(self, members: Sequence[tuple[str, int, int]]) -> str:
        """``tbl.<hash>`` of (hash key, id, weight) members at this size and seed."""
        memo = tuple(members)
        found = self._key_cache.get(memo)
        if found is None:
            text = f"{self.table_size}|{self.seed}|" + "|".join(
                f"{k},{i},{w}" for k, i, w in sorted(memo))
            found = TABLE_PREFIX + hashlib.blake2b(text.encode(), digest_size=10).hexdigest()
            if len(self._key_cache) > 100_000:
                self._key_cache.clear()
            self._key_cache[memo] = found
        return found

    def _table_for(self, backends: Iterable[Backend], ids: Mapping[L3n4, int],
                   changes: Changes) -> str | None:
        members = [(backend_hash_key(b.address, b.port, b.protocol), ids[b.l3n4], b.weight)
                   for b in table_members(backends)]
        if not members:
            return None
        key = self.table_key(members)
        if key not in self.tables:
            chosen = [MaglevBackend(i, k, w) for k, i, w in members]
            table = self.builder(chosen, self.table_size, self.seed)
            self.builds += 1
            entry = TableEntry(key, self.table_size, tuple(sorted(i for _, i, _ in members)),
                               table_bytes(table))
            self.tables[key] = entry
            changes.puts[key] = entry.kv_value()
            changes.deletes.discard(key)
        return key

    def _backend_half(self, resolved: Resolved, ids: Mapping[L3n4, int],
                      changes: Changes) -> dict[str, Any]:
        service = resolved.service
        algorithm = algorithm_of(service, self.default_algorithm)
        local_ports = {f.port_name for f in resolved.frontends if f.scope == Scope.LOCAL}
        memo = (resolved.group, algorithm, tuple(sorted(local_ports)))
        cached = self._render_cache.get(memo)
        if cached is not None and all(k in self.tables for k in cached["_tables"]):
            return cached
        tables: dict[str, str | None] = {}
        local_tables: dict[str, dict[str, str | None]] = {}
        by_port: dict[str, list[Backend]] = {}
        for b in resolved.backends:
            by_port.setdefault(b.port_name, []).append(b)
        for port in service.spec.ports:
            name = port.name or ""
            members = by_port.get(name, [])
            if algorithm != LbAlgorithm.MAGLEV:
                continue
            tables[name] = self._table_for(members, ids, changes)
            if name in local_ports:
                nodes = sorted({b.node for b in members})
                local_tables[name] = {
                    node: self._table_for([b for b in members if b.node == node], ids, changes)
                    for node in nodes
                }
        used = {k for k in tables.values() if k} | {
            k for per_node in local_tables.values() for k in per_node.values() if k}
        half = {
            "backends": [b.kv_value(ids[b.l3n4]) for b in resolved.backends],
            "tables": tables,
            "local_tables": local_tables,
            "_tables": used,
        }
        self._render_cache[memo] = half
        return half

    def render(self, items: Iterable[tuple[Ref, Resolved | None]],
               backend_ids: Mapping[L3n4, int], frontend_ids: Mapping[str, int]) -> Changes:
        """KV writes for resolved Services; ids must cover every backend and frontend."""
        changes = Changes()
        for ref, resolved in items:
            key = service_key(*ref)
            old_tables = self.service_tables.pop(ref, set())
            self.resolved.pop(ref, None)
            if resolved is None:
                self._frontends.pop(ref, None)
                self._frontend_values.pop(ref, None)
                self._halves.pop(ref, None)
                self._published_service.pop(ref, None)
                if self.published.pop(ref, None) is not None:
                    changes.deletes.add(key)
                new_tables: set[str] = set()
            else:
                service = resolved.service
                half = self._backend_half(resolved, backend_ids, changes)
                fronts = self._frontend_values.get(ref)
                if fronts is None or fronts[0] is not resolved.frontends:
                    fronts = (resolved.frontends, [f.kv_value(frontend_ids[f.id_key])
                                                   for f in resolved.frontends])
                    self._frontend_values[ref] = fronts
                unchanged = (ref in self.published and self._halves.get(ref) is half
                             and self.published[ref]["frontends"] is fronts[1]
                             and self._published_service.get(ref) is service)
                self._halves[ref] = half
                self._published_service[ref] = service
                value = {
                    "namespace": ref[0],
                    "name": ref[1],
                    "type": service.spec.type.value,
                    "algorithm": algorithm_of(service, self.default_algorithm).value,
                    "affinity_timeout": affinity_timeout(service),
                    "frontends": fronts[1],
                    "backends": half["backends"],
                    "tables": half["tables"],
                    "local_tables": half["local_tables"],
                }
                new_tables = set(half["_tables"])
                self.resolved[ref] = resolved
                if not unchanged:
                    self.published[ref] = value
                    changes.puts[key] = value
            self.service_tables[ref] = new_tables
            for table in new_tables:
                self.table_users.setdefault(table, set()).add(ref)
            for table in old_tables - new_tables:
                users = self.table_users.get(table, set())
                users.discard(ref)
                if not users:
                    self.table_users.pop(table, None)
                    self.tables.pop(table, None)
                    changes.puts.pop(table, None)
                    changes.deletes.add(table)
        if len(self._render_cache) > 10_000:
            self._render_cache.clear()
        return changes

    def table(self, key: str) -> TableEntry | None:
        return self.tables.get(key)


def needed_ids(items: Iterable[tuple[Ref, Resolved | None]]) -> tuple[set[L3n4], set[str]]:
    """The backend addresses and frontend id keys ``render`` will need ids for."""
    backends: set[L3n4] = set()
    fronts: set[str] = set()
    seen: set[int] = set()
    for _ref, resolved in items:
        if resolved is not None:
            if id(resolved.backends) not in seen:
                seen.add(id(resolved.backends))
                backends |= resolved.addresses()
            fronts |= {f.id_key for f in resolved.frontends}
    return backends, fronts

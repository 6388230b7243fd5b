"""KV `lb`-shaped dicts (docs/lb.md) for tests and the kube-proxy benchmark, with Maglev tables
from services.lb's own algorithm."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from services.lb.core.maglev import MaglevBackend, backend_hash_key, build_table, table_bytes


@dataclass
class Backend:
    id: int
    address: str
    port: int
    node: str
    protocol: str = "TCP"
    state: str = "active"
    weight: int = 100
    port_name: str = "p0"


@dataclass
class Frontend:
    id: int
    address: str
    port: int
    type: str = "ClusterIP"
    protocol: str = "TCP"
    scope: str = "cluster"
    port_name: str = "p0"


@dataclass
class Service:
    namespace: str
    name: str
    frontends: list[Frontend]
    backends: list[Backend]
    algorithm: str = "maglev"
    affinity_timeout: int = 0
    type: str = "ClusterIP"
    extra: dict[str, Any] = field(default_factory=dict)


def render(services: list[Service], m: int = 16381,
           cache: dict[tuple[Any, ...], tuple[str, dict[str, Any]]] | None = None,
           ) -> dict[str, dict[str, Any]]:
    """The whole bucket: ``svc.*`` entries plus the ``tbl.*`` tables they point at."""
    out: dict[str, dict[str, Any]] = {}
    cache = {} if cache is None else cache
    for s in services:
        tables: dict[str, str | None] = {}
        for pn in sorted({f.port_name for f in s.frontends}):
            members = [b for b in s.backends if b.port_name == pn and b.state == "active"
                       and b.weight > 0]
            if s.algorithm != "maglev" or not members:
                tables[pn] = None
                continue
            sig = (m, tuple(sorted((b.id, b.address, b.port, b.protocol, b.weight)
                                   for b in members)))
            if sig not in cache:
                tbl = build_table([MaglevBackend(b.id, backend_hash_key(b.address, b.port,
                                                                        b.protocol), b.weight)
                                   for b in members], m)
                key = "tbl." + hashlib.sha256(repr(sig).encode()).hexdigest()[:24]
                cache[sig] = (key, {"m": m, "backend_ids": sorted(b.id for b in members),
                                    "table": table_bytes(tbl)})
            key, val = cache[sig]
            out[key] = val
            tables[pn] = key
        out[f"svc.{s.namespace}.{s.name}"] = {
            "namespace": s.namespace, "name": s.name, "type": s.type,
            "algorithm": s.algorithm, "affinity_timeout": s.affinity_timeout,
            "frontends": [vars(f) | {} for f in s.frontends],
            "backends": [vars(b) | {} for b in s.backends],
            "tables": tables, "local_tables": {}, **s.extra,
        }
    return out

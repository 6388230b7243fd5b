"""The service map (as Hubble UI draws it): workloads as nodes, flows between them as edges.

A pod's workload is its first ``workloads`` entry, else its name without the ReplicaSet and
pod suffixes (``web-5d4f8b6c9-x2k9q`` → ``web``). Endpoints without a pod are named by their
reserved identity (``world``, ``host``...) or their IP. Replies are left out, so an edge points
from the client to the server; an edge counts its verdicts and is ``DROPPED`` when any flow on
it was dropped.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ciliate.flows.model import Wire, is_lost
from ciliate.flows.tables import Verdict
from ciliate.labels.reserved import ReservedIdentity

_POD_SUFFIX = re.compile(r"^(?P<name>.+?)(?:-[0-9a-f]{6,10})?-[0-9a-z]{5}$")
_RESERVED = {int(r): r.label_name for r in ReservedIdentity}


def workload_of(pod: str, workloads: list[Any] | None) -> str:
    if workloads:
        first = workloads[0]
        return str(first[0] if isinstance(first, (list, tuple)) else first)
    m = _POD_SUFFIX.match(pod)
    return m.group("name") if m else pod


def _node(w: Wire, side: str) -> tuple[str, dict[str, str]]:
    ns, pod = w.get(side + "n", ""), w.get(side + "pn", "")
    if pod:
        name = workload_of(pod, w.get(side + "w"))
        return f"{ns}/{name}", {"namespace": ns, "name": name, "kind": "workload"}
    identity = w.get(side + "i", 0)
    if identity in _RESERVED:
        name = _RESERVED[identity]
        return f"reserved:{name}", {"namespace": "", "name": name, "kind": "reserved"}
    ip = w.get(side + "ip", "") or "unknown"
    return f"ip:{ip}", {"namespace": ns, "name": ip, "kind": "ip"}


@dataclass
class _Edge:
    source: str
    destination: str
    verdicts: dict[str, int] = field(default_factory=dict)
    ports: set[str] = field(default_factory=set)


def _verdict_name(value: int) -> str:
    try:
        return Verdict(value).name
    except ValueError:
        return str(value)


_PROTO = {6: "TCP", 17: "UDP", 132: "SCTP", 1: "ICMPv4", 58: "ICMPv6"}


def build(records: Iterable[Wire]) -> dict[str, Any]:
    """``{"nodes": [...], "edges": [...]}`` for the flows in ``records``."""
    nodes: dict[str, dict[str, str]] = {}
    edges: dict[tuple[str, str], _Edge] = {}
    for w in records:
        if is_lost(w) or w.get("rp"):
            continue
        src, src_info = _node(w, "s")
        dst, dst_info = _node(w, "d")
        nodes.setdefault(src, {"id": src, **src_info})
        nodes.setdefault(dst, {"id": dst, **dst_info})
        edge = edges.get((src, dst))
        if edge is None:
            edge = edges[(src, dst)] = _Edge(src, dst)
        verdict = _verdict_name(w.get("v", 0))
        edge.verdicts[verdict] = edge.verdicts.get(verdict, 0) + 1
        proto = _PROTO.get(w.get("p", 0))
        if proto and w.get("dp"):
            edge.ports.add(f"{w['dp']}/{proto}")
        elif proto:
            edge.ports.add(proto)
    return {
        "nodes": sorted(nodes.values(), key=lambda n: n["id"]),
        "edges": [
            {"source": e.source, "destination": e.destination, "verdicts": e.verdicts,
             "ports": sorted(e.ports),
             "verdict": "DROPPED" if e.verdicts.get("DROPPED") else
             max(e.verdicts, key=lambda k: e.verdicts[k])}
            for e in sorted(edges.values(), key=lambda e: (e.source, e.destination))
        ],
    }

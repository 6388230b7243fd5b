"""Dev-mode name resolution. A dev cluster runs no cluster DNS, so each dev pod gets an
/etc/hosts (``ip netns exec`` bind-mounts ``/etc/netns/<netns>/hosts`` over it) naming the
Services' ClusterIPs the way kube-dns answers for them: ``<svc>.<ns>.svc.cluster.local``,
``<svc>.<ns>.svc``, ``<svc>.<ns>``, and ``<svc>`` inside the pod's own namespace."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

CLUSTER_DOMAIN = "cluster.local"
HEADER = "127.0.0.1 localhost\n::1 localhost ip6-localhost\n"


def hosts_file(lb_values: Iterable[tuple[str, Any]], namespace: str) -> str:
    """The hosts file of a pod in ``namespace``, from KV ``lb`` items (``svc.*`` keys)."""
    lines: list[str] = []
    for key, svc in sorted(lb_values, key=lambda kv: kv[0]):
        if not key.startswith("svc.") or not isinstance(svc, Mapping):
            continue
        ns, name = svc.get("namespace"), svc.get("name")
        if not isinstance(ns, str) or not isinstance(name, str):
            continue
        ips = sorted({fe["address"] for fe in svc.get("frontends") or ()
                      if isinstance(fe, Mapping) and fe.get("type") == "ClusterIP"
                      and isinstance(fe.get("address"), str)})
        names = [f"{name}.{ns}.svc.{CLUSTER_DOMAIN}", f"{name}.{ns}.svc", f"{name}.{ns}"]
        if ns == namespace:
            names.append(name)
        lines += [f"{ip} {' '.join(names)}" for ip in ips]
    return HEADER + "".join(f"{line}\n" for line in lines)

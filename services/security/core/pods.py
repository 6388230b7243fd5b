"""Which pod a cgroup id belongs to, and which pod cgroups a namespaced or pod-selecting policy
applies to. Pure: the caller lists the node's cgroup directories and mirrors KV `endpoints`.

Pod cgroup directories are ``<node subtree>/<namespace>.<name>`` (the datapath sandbox's
convention, the same as the endpoints KV key).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ciliate.resources.selectors import LabelSelector


def pod_json(endpoint: Mapping[str, Any]) -> dict[str, Any]:
    """Tetragon's `Pod` message for an endpoint record (proto field names)."""
    out: dict[str, Any] = {"namespace": endpoint.get("namespace", ""),
                           "name": endpoint.get("name", "")}
    labels = endpoint.get("pod_labels") or {}
    if labels:
        out["pod_labels"] = dict(labels)
    return out


@dataclass
class PodIndex:
    """Endpoints of this node joined with the cgroup ids of their directories."""

    node: str
    endpoints: dict[str, Mapping[str, Any]] = field(default_factory=dict)
    """KV `endpoints` key ("<ns>.<name>") -> record, only those on this node."""
    cgroups: dict[str, int] = field(default_factory=dict)
    """Directory name ("<ns>.<name>") -> cgroup id."""
    _by_cgroup: dict[int, dict[str, Any]] = field(default_factory=dict)

    def set_endpoint(self, key: str, record: Mapping[str, Any] | None) -> bool:
        """Apply one KV change; True when this node's pods changed."""
        mine = record is not None and record.get("node") == self.node
        if not mine:
            return self.endpoints.pop(key, None) is not None and self._rebuild()
        assert record is not None
        if self.endpoints.get(key) == record:
            return False
        self.endpoints[key] = record
        return self._rebuild()

    def set_cgroups(self, cgroups: Mapping[str, int]) -> bool:
        """Replace the directory listing; True when it changed."""
        if dict(cgroups) == self.cgroups:
            return False
        self.cgroups = dict(cgroups)
        return self._rebuild()

    def _rebuild(self) -> bool:
        self._by_cgroup = {
            cg: pod_json(self.endpoints[name])
            for name, cg in self.cgroups.items() if name in self.endpoints
        }
        return True

    def pod_of(self, cgroup_id: int) -> dict[str, Any] | None:
        return self._by_cgroup.get(cgroup_id)

    def allowed_cgroups(self, namespace: str | None,
                        pod_selector: Mapping[str, Any] | None) -> set[int]:
        """Cgroup ids of this node's pods in ``namespace`` (any when None) whose labels match
        ``pod_selector`` (all when None), as Tetragon scopes namespaced and pod-selected
        policies."""
        selector = LabelSelector.model_validate(dict(pod_selector)) if pod_selector else None
        out: set[int] = set()
        for name, cg in self.cgroups.items():
            ep = self.endpoints.get(name)
            if ep is None:
                continue
            if namespace is not None and ep.get("namespace") != namespace:
                continue
            if selector is not None and not selector.matches(ep.get("pod_labels") or {}):
                continue
            out.add(cg)
        return out


def cgroup_path_in(subtree_relative: str, proc_cgroup_text: str) -> bool:
    """Whether /proc/<pid>/cgroup's v2 line ("0::/path") is inside ``subtree_relative``."""
    for line in proc_cgroup_text.splitlines():
        if line.startswith("0::"):
            path = line[3:].strip()
            return path == subtree_relative or path.startswith(subtree_relative.rstrip("/") + "/")
    return False


def names(entries: Iterable[str]) -> list[str]:
    """Directory names that look like pod cgroups ("<ns>.<name>")."""
    return [e for e in entries if "." in e and not e.startswith("cgroup.")]

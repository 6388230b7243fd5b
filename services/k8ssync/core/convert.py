"""Kubernetes objects to the documents the owning services store, and back for status.

Objects the sync applied carry the annotation :data:`SOURCE_ANNOTATION`, so a relist deletes
only what came from the cluster and vanished, never objects a user applied with ``ciliate apply``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

SOURCE_ANNOTATION = "ciliate.io/source"
SOURCE_KUBERNETES = "kubernetes"
K8S_RV_ANNOTATION = "ciliate.io/k8s-resource-version"

_DROPPED_METADATA = ("managedFields", "resourceVersion", "selfLink", "generation",
                     "creationTimestamp", "deletionGracePeriodSeconds")
"""Server-side bookkeeping that would only make every stored object differ on each event."""


@dataclass(frozen=True, order=True)
class ObjectKey:
    kind: str
    namespace: str
    """"" for cluster-scoped kinds."""
    name: str

    def rest_path(self) -> str:
        """The owning service's REST path (namespace ``_`` for cluster-scoped objects)."""
        return f"/v1/resources/{self.kind}/{self.namespace or '_'}/{self.name}"


def key_of(obj: Mapping[str, Any], kind: str | None = None) -> ObjectKey:
    meta = obj.get("metadata") or {}
    return ObjectKey(str(kind or obj.get("kind") or ""), str(meta.get("namespace") or ""),
                     str(meta.get("name") or ""))


def to_document(obj: Mapping[str, Any], kind: str, api_version: str) -> dict[str, Any]:
    """The document to ``POST /v1/resources``: list items lack kind/apiVersion, so set them;
    drop server bookkeeping; mark the object as coming from Kubernetes."""
    doc = copy.deepcopy(dict(obj))
    doc["kind"] = kind
    doc["apiVersion"] = api_version
    meta = dict(doc.get("metadata") or {})
    rv = meta.get("resourceVersion")
    for field in _DROPPED_METADATA:
        meta.pop(field, None)
    annotations = dict(meta.get("annotations") or {})
    annotations.pop("kubectl.kubernetes.io/last-applied-configuration", None)
    annotations[SOURCE_ANNOTATION] = SOURCE_KUBERNETES
    if rv:
        annotations[K8S_RV_ANNOTATION] = str(rv)
    meta["annotations"] = annotations
    doc["metadata"] = meta
    return doc


def from_kubernetes(doc: Mapping[str, Any]) -> bool:
    annotations = (doc.get("metadata") or {}).get("annotations") or {}
    return bool(annotations.get(SOURCE_ANNOTATION) == SOURCE_KUBERNETES)


def vanished(stored: Iterable[Mapping[str, Any]], listed: set[ObjectKey],
             kind: str) -> list[ObjectKey]:
    """Objects the sync once applied that a fresh list no longer has: delete them."""
    gone = {key_of(doc, kind) for doc in stored if from_kubernetes(doc)} - listed
    return sorted(gone)


def ciliumendpoint(value: Mapping[str, Any], pod_uid: str | None = None) -> dict[str, Any]:
    """A ``cilium.io/v2`` CiliumEndpoint for one KV ``endpoints`` value, shaped as Cilium
    writes it (``status.id``, ``identity``, ``networking.addressing``, ``state``)."""
    namespace, name = str(value["namespace"]), str(value["name"])
    meta: dict[str, Any] = {"name": name, "namespace": namespace,
                            "labels": {SOURCE_ANNOTATION: SOURCE_KUBERNETES}}
    if pod_uid:
        meta["ownerReferences"] = [{"apiVersion": "v1", "kind": "Pod", "name": name,
                                    "uid": pod_uid, "blockOwnerDeletion": True}]
    named_ports = [{"name": p["name"], "port": int(p["port"]), "protocol": p.get("protocol", "TCP")}
                   for p in value.get("ports") or [] if p.get("name")]
    status: dict[str, Any] = {
        "id": int(value["id"]),
        "identity": {"id": int(value["identity"]), "labels": sorted(value.get("labels") or [])},
        "networking": {"addressing": [{"ipv4": ip} if ":" not in ip else {"ipv6": ip}
                                      for ip in value.get("ips") or []],
                       "node": str(value.get("node") or "")},
        "state": "ready" if value.get("ready", True) else "waiting-for-identity",
        "encryption": {},
    }
    if named_ports:
        status["named-ports"] = named_ports
    return {"apiVersion": "cilium.io/v2", "kind": "CiliumEndpoint", "metadata": meta,
            "status": status}


def policy_condition(valid: bool, message: str, now: str) -> dict[str, Any]:
    """The ``status.conditions`` entry Cilium sets on a CiliumNetworkPolicy it parsed."""
    return {"type": "Valid", "status": "True" if valid else "False",
            "lastTransitionTime": now, "message": message,
            "reason": "PolicyValid" if valid else "PolicyInvalid"}

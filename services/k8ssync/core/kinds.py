"""The Kubernetes kinds the sync watches, as data: where each lives in the API."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ApiKind:
    kind: str
    group: str
    """"" for the core group."""
    version: str
    plural: str
    namespaced: bool

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def collection_path(self, namespace: str | None = None) -> str:
        """``/api/v1/pods``, ``/apis/cilium.io/v2/namespaces/x/ciliumnetworkpolicies``, ..."""
        base = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        if namespace and self.namespaced:
            return f"{base}/namespaces/{namespace}/{self.plural}"
        return f"{base}/{self.plural}"

    def object_path(self, namespace: str | None, name: str) -> str:
        return f"{self.collection_path(namespace)}/{name}"


WATCHED: tuple[ApiKind, ...] = (
    ApiKind("Namespace", "", "v1", "namespaces", False),
    ApiKind("Pod", "", "v1", "pods", True),
    ApiKind("Service", "", "v1", "services", True),
    ApiKind("EndpointSlice", "discovery.k8s.io", "v1", "endpointslices", True),
    ApiKind("NetworkPolicy", "networking.k8s.io", "v1", "networkpolicies", True),
    ApiKind("CiliumNetworkPolicy", "cilium.io", "v2", "ciliumnetworkpolicies", True),
    ApiKind("CiliumClusterwideNetworkPolicy", "cilium.io", "v2",
            "ciliumclusterwidenetworkpolicies", False),
    ApiKind("TracingPolicy", "cilium.io", "v1alpha1", "tracingpolicies", False),
    ApiKind("TracingPolicyNamespaced", "cilium.io", "v1alpha1", "tracingpoliciesnamespaced", True),
)
"""Watched in this order at start, so namespaces and pods arrive before the policies naming them."""

CILIUM_ENDPOINT = ApiKind("CiliumEndpoint", "cilium.io", "v2", "ciliumendpoints", True)
"""Written (not watched): the per-pod endpoint state Cilium publishes."""

BY_KIND: dict[str, ApiKind] = {k.kind: k for k in (*WATCHED, CILIUM_ENDPOINT)}

"""The security labels Cilium derives for a pod from its labels, namespace and service account."""

from __future__ import annotations

from collections.abc import Mapping

from ciliate.labels.filter import DEFAULT_FILTER, LabelFilter
from ciliate.labels.model import Label, LabelSet

K8S_SOURCE = "k8s"
POD_NAMESPACE_LABEL = "io.kubernetes.pod.namespace"
NAMESPACE_LABELS_PREFIX = "io.cilium.k8s.namespace.labels."
SERVICE_ACCOUNT_LABEL = "io.cilium.k8s.policy.serviceaccount"
CLUSTER_LABEL = "io.cilium.k8s.policy.cluster"
DEFAULT_CLUSTER = "default"
DEFAULT_SERVICE_ACCOUNT = "default"


def endpoint_labels(
    pod_labels: Mapping[str, str],
    namespace: str,
    namespace_labels: Mapping[str, str],
    service_account: str = DEFAULT_SERVICE_ACCOUNT,
    cluster: str = DEFAULT_CLUSTER,
    label_filter: LabelFilter | None = None,
) -> LabelSet:
    """Filtered pod labels plus namespace, namespace-label, service-account and cluster labels.

    These are exactly the labels selectors see: ``namespaceSelector`` matches the
    ``io.cilium.k8s.namespace.labels.*`` keys, and namespaced policies scope by
    ``io.kubernetes.pod.namespace``.
    """
    lf = label_filter or DEFAULT_FILTER
    derived: dict[str, str] = {POD_NAMESPACE_LABEL: namespace}
    for key, value in namespace_labels.items():
        derived[NAMESPACE_LABELS_PREFIX + key] = value
    if service_account:
        derived[SERVICE_ACCOUNT_LABEL] = service_account
    if cluster:
        derived[CLUSTER_LABEL] = cluster
    labels = [Label(K8S_SOURCE, k, v) for k, v in pod_labels.items() if k not in derived]
    labels += [Label(K8S_SOURCE, k, v) for k, v in derived.items()]
    return LabelSet(lf.filter(labels))

"""Security labels derived for pods: what identity sharing and namespace selectors depend on."""

from __future__ import annotations

from ciliate.labels import Label, LabelFilter, endpoint_labels


def test_endpoint_labels_carry_namespace_serviceaccount_cluster() -> None:
    labels = endpoint_labels({"app": "web"}, "prod", {"team": "a"}, service_account="sa1")
    assert labels.sorted_strings() == [
        "k8s:app=web",
        "k8s:io.cilium.k8s.namespace.labels.team=a",
        "k8s:io.cilium.k8s.policy.cluster=default",
        "k8s:io.cilium.k8s.policy.serviceaccount=sa1",
        "k8s:io.kubernetes.pod.namespace=prod",
    ]


def test_replica_specific_labels_are_dropped_so_replicas_share_identity() -> None:
    base = {"app": "web", "app.kubernetes.io/name": "web"}
    one = endpoint_labels(
        base | {"pod-template-hash": "abc", "controller-uid": "1", "kubernetes.io/x": "y"}, "n", {}
    )
    two = endpoint_labels(
        base | {"pod-template-hash": "def", "statefulset.kubernetes.io/pod-name": "web-0"}, "n", {}
    )
    assert one == two
    assert Label("k8s", "app.kubernetes.io/name", "web") in one


def test_namespace_kubernetes_labels_survive_under_cilium_prefix() -> None:
    labels = endpoint_labels({}, "x", {"kubernetes.io/metadata.name": "x"})
    assert Label("k8s", "io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name", "x") in labels


def test_user_include_patterns_restrict_pod_labels_but_keep_derived() -> None:
    lf = LabelFilter.from_patterns(["^app$"])
    labels = endpoint_labels({"app": "web", "version": "1"}, "x", {}, label_filter=lf)
    keys = {label.key for label in labels}
    assert "app" in keys and "version" not in keys
    assert "io.kubernetes.pod.namespace" in keys


def test_user_exclude_pattern_drops_label() -> None:
    lf = LabelFilter.from_patterns(["!version"])
    labels = endpoint_labels({"app": "web", "version": "1"}, "x", {}, label_filter=lf)
    assert {label.key for label in labels} >= {"app"} and "version" not in labels.as_dict()
    assert lf.keep(Label("reserved", "host"))

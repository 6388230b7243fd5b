"""Cluster objects into owner documents, relist deletions, CiliumEndpoint shape, kubeconfig."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ciliate.resources.registry import parse_resource, resource_class
from services.k8ssync.core.convert import (
    SOURCE_ANNOTATION,
    ObjectKey,
    ciliumendpoint,
    key_of,
    to_document,
    vanished,
)
from services.k8ssync.core.kinds import BY_KIND, WATCHED
from services.k8ssync.core.kubeconfig import KubeConfigError, from_kubeconfig, in_cluster

LISTED_POD: dict[str, Any] = {"metadata": {"name": "web", "namespace": "prod", "uid": "u1",
                           "resourceVersion": "42", "managedFields": [{"manager": "x"}],
                           "annotations": {
                               "kubectl.kubernetes.io/last-applied-configuration": "{}"}},
              "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "i"}]},
              "status": {"podIP": "10.0.0.5"}}


def test_list_items_become_valid_documents_marked_as_from_the_cluster() -> None:
    doc = to_document(LISTED_POD, "Pod", "v1")
    assert doc["kind"] == "Pod" and doc["apiVersion"] == "v1"
    meta = doc["metadata"]
    assert "managedFields" not in meta and "resourceVersion" not in meta
    assert meta["annotations"] == {SOURCE_ANNOTATION: "kubernetes",
                                   "ciliate.io/k8s-resource-version": "42"}
    assert meta["uid"] == "u1"
    assert parse_resource(doc).kind == "Pod"
    assert LISTED_POD["metadata"]["managedFields"], "the input is not modified"


def test_every_watched_kind_is_one_ciliate_stores() -> None:
    for kind in WATCHED:
        cls = resource_class(kind.kind, kind.api_version)
        assert kind.namespaced == cls.NAMESPACED, kind.kind


def test_paths_follow_the_api_layout() -> None:
    assert BY_KIND["Pod"].collection_path() == "/api/v1/pods"
    assert BY_KIND["Namespace"].object_path(None, "x") == "/api/v1/namespaces/x"
    assert (BY_KIND["CiliumNetworkPolicy"].object_path("ns", "p")
            == "/apis/cilium.io/v2/namespaces/ns/ciliumnetworkpolicies/p")
    assert (BY_KIND["TracingPolicy"].collection_path("ignored")
            == "/apis/cilium.io/v1alpha1/tracingpolicies")


names = st.sets(st.sampled_from(["a", "b", "c", "d", "e"]))


@given(stored_from_k8s=names, stored_by_user=names, listed=names)
def test_relist_deletes_exactly_the_cluster_objects_that_vanished(
        stored_from_k8s: set[str], stored_by_user: set[str], listed: set[str]) -> None:
    def doc(name: str, ours: bool) -> dict[str, Any]:
        annotations = {SOURCE_ANNOTATION: "kubernetes"} if ours else {}
        return {"metadata": {"name": name, "namespace": "x", "annotations": annotations}}

    stored = [doc(n, True) for n in stored_from_k8s]
    stored += [doc("user-" + n, False) for n in stored_by_user]
    gone = vanished(stored, {ObjectKey("Pod", "x", n) for n in listed}, "Pod")
    assert gone == sorted(ObjectKey("Pod", "x", n) for n in stored_from_k8s - listed)


def test_ciliumendpoint_carries_identity_addresses_and_owner() -> None:
    cep = ciliumendpoint({"id": 7, "namespace": "prod", "name": "web", "identity": 1234,
                          "labels": ["k8s:app=web"], "ips": ["10.0.0.5"], "node": "n1",
                          "ports": [{"name": "http", "port": 80, "protocol": "TCP"}],
                          "ready": True}, pod_uid="u1")
    assert key_of(cep) == ObjectKey("CiliumEndpoint", "prod", "web")
    assert cep["status"]["identity"] == {"id": 1234, "labels": ["k8s:app=web"]}
    assert cep["status"]["networking"] == {"addressing": [{"ipv4": "10.0.0.5"}], "node": "n1"}
    assert cep["status"]["named-ports"] == [{"name": "http", "port": 80, "protocol": "TCP"}]
    assert cep["metadata"]["ownerReferences"][0]["uid"] == "u1"


def _kubeconfig(user: dict[str, Any]) -> dict[str, Any]:
    return {"current-context": "c",
            "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u",
                                                   "namespace": "kube-system"}}],
            "clusters": [{"name": "k", "cluster": {
                "server": "https://10.0.0.1:6443/",
                "certificate-authority-data": base64.b64encode(b"PEM").decode()}}],
            "users": [{"name": "u", "user": user}]}


def test_kubeconfig_resolves_the_current_context() -> None:
    access = from_kubeconfig(_kubeconfig({"token": "t",
                                          "client-key-data": base64.b64encode(b"K").decode()}))
    assert access.server == "https://10.0.0.1:6443"
    assert (access.ca_data, access.token, access.client_key_data) == ("PEM", "t", b"K")
    assert access.namespace == "kube-system"


@pytest.mark.parametrize("user", [{"exec": {"command": "aws"}}, {"token": "t"}])
def test_kubeconfig_problems_are_named(user: dict[str, Any]) -> None:
    doc = _kubeconfig(user)
    if "token" in user:
        doc["current-context"] = "missing"
        with pytest.raises(KubeConfigError, match="no context named 'missing'"):
            from_kubeconfig(doc)
    else:
        with pytest.raises(KubeConfigError, match="exec"):
            from_kubeconfig(doc)


def test_in_cluster_uses_the_service_account() -> None:
    access = in_cluster({"KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "443"})
    assert access.server == "https://[fd00::1]:443"
    assert access.token_file.endswith("/serviceaccount/token")
    with pytest.raises(KubeConfigError):
        in_cluster({})

"""infra/k8s and infra/kind: valid against the Kubernetes OpenAPI schemas (offline, from the
kubernetes-validate package), CRD schemas structural and accepting the objects users bring,
RBAC covering exactly what the sync does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from services.k8ssync.core.convert import ciliumendpoint, policy_condition
from services.k8ssync.core.kinds import CILIUM_ENDPOINT, WATCHED

REPO = Path(__file__).resolve().parents[3]
K8S = REPO / "infra" / "k8s"
EXAMPLES = REPO.parent / "shared" / "examples"
K8S_VERSION = "1.30.0"


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


MANIFESTS = [(p.name, i, d) for p in sorted(K8S.glob("*.yaml"))
             for i, d in enumerate(documents(p))]
ALL = [d for _, _, d in MANIFESTS]


def crd_schemas() -> dict[str, dict[str, Any]]:
    return {d["spec"]["names"]["kind"]: d["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
            for d in ALL if d["kind"] == "CustomResourceDefinition"}


@pytest.mark.parametrize(("file", "index", "doc"), MANIFESTS,
                         ids=[f"{f}#{i}-{d['kind']}" for f, i, d in MANIFESTS])
def test_manifest_is_valid_against_the_kubernetes_openapi_schema(
        file: str, index: int, doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_a_broken_manifest_is_caught() -> None:
    bad = next(d for d in ALL if d["kind"] == "DaemonSet")
    broken = {**bad, "spec": {**bad["spec"], "updateStrategy": {"type": 3}}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def _structural_problems(node: dict[str, Any], path: str) -> list[str]:
    if node.get("x-kubernetes-preserve-unknown-fields") or node.get("x-kubernetes-int-or-string"):
        if "type" not in node and not node.get("x-kubernetes-int-or-string"):
            return [f"{path}: preserve-unknown-fields without a type"]
    elif "type" not in node:
        return [f"{path}: no type"]
    out = []
    for name, child in (node.get("properties") or {}).items():
        out += _structural_problems(child, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        out += _structural_problems(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        out += _structural_problems(node["additionalProperties"], f"{path}{{}}")
    return out


def test_crds_cover_the_cilium_and_tetragon_kinds_with_structural_schemas() -> None:
    schemas = crd_schemas()
    assert set(schemas) == {"CiliumNetworkPolicy", "CiliumClusterwideNetworkPolicy",
                            "CiliumEndpoint", "TracingPolicy", "TracingPolicyNamespaced"}
    for name, schema in schemas.items():
        assert _structural_problems(schema, name) == []
    crds = {d["spec"]["names"]["kind"]: d for d in ALL if d["kind"] == "CustomResourceDefinition"}
    for kind in (*WATCHED, CILIUM_ENDPOINT):
        if kind.group == "cilium.io":
            spec = crds[kind.kind]["spec"]
            assert (spec["names"]["plural"], spec["versions"][0]["name"]) == (
                kind.plural, kind.version)
            assert (spec["scope"] == "Namespaced") == kind.namespaced


def example_objects() -> list[dict[str, Any]]:
    if not EXAMPLES.is_dir():
        pytest.skip(f"shared examples not found at {EXAMPLES}")
    return [d for p in sorted(EXAMPLES.glob("*.yaml")) for d in documents(p)
            if d.get("kind") in crd_schemas()]


def test_users_cilium_and_tetragon_objects_validate_against_the_crds() -> None:
    schemas = crd_schemas()
    objects = example_objects()
    assert {o["kind"] for o in objects} >= {"CiliumNetworkPolicy", "TracingPolicy"}
    for obj in objects:
        jsonschema.validate(obj, schemas[obj["kind"]])


def test_what_the_sync_writes_validates_against_the_crds() -> None:
    schemas = crd_schemas()
    cep = ciliumendpoint({"id": 3, "namespace": "x", "name": "a", "identity": 300,
                          "labels": ["k8s:pod=a"], "ips": ["10.244.1.10"], "node": "n",
                          "ports": [{"name": "serve-80-tcp", "port": 80, "protocol": "TCP"}]},
                         pod_uid="u")
    jsonschema.validate(cep, schemas["CiliumEndpoint"])
    condition = policy_condition(False, "bad port", "2024-01-01T00:00:00Z")
    cnp: dict[str, Any] = {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
           "metadata": {"name": "p"}, "spec": {"endpointSelector": {}},
           "status": {"conditions": [condition]}}
    jsonschema.validate(cnp, schemas["CiliumNetworkPolicy"])
    condition["status"] = "Maybe"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(cnp, schemas["CiliumNetworkPolicy"])


def _grants(rules: list[dict[str, Any]], group: str, resource: str) -> set[str]:
    return {verb for r in rules if group in r["apiGroups"] and resource in r["resources"]
            for verb in r["verbs"]}


def test_rbac_grants_the_sync_what_it_does_and_no_more() -> None:
    role = next(d for d in ALL if d["kind"] == "ClusterRole"
                and d["metadata"]["name"] == "ciliate-k8s-sync")
    rules = role["rules"]
    for kind in WATCHED:
        assert _grants(rules, kind.group, kind.plural) == {"get", "list", "watch"}, kind.kind
    assert _grants(rules, "cilium.io", "ciliumendpoints") >= {"get", "create", "update", "delete"}
    for plural in ("ciliumnetworkpolicies", "ciliumclusterwidenetworkpolicies"):
        assert _grants(rules, "cilium.io", f"{plural}/status") == {"patch", "update"}
    for rule in rules:
        assert "*" not in rule["verbs"]
        assert "*" not in rule["resources"]
        assert "secrets" not in rule["resources"]
    bindings = [d for d in ALL if d["kind"] in ("ClusterRoleBinding", "RoleBinding")]
    assert [b["subjects"][0]["name"] for b in bindings] == ["k8s-sync"]


def test_node_agents_and_replicated_services_are_deployed_as_designed() -> None:
    ds = next(d for d in ALL if d["kind"] == "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    assert pod["hostNetwork"] and pod["hostPID"]
    agents = {c["name"]: c for c in pod["containers"]}
    for name in ("datapath", "security"):
        assert agents[name]["securityContext"]["privileged"]
        mounts = {m["mountPath"] for m in agents[name]["volumeMounts"]}
        assert {"/sys/fs/bpf", "/sys/fs/cgroup", "/lib/modules"} <= mounts
    replicas = {d["metadata"]["name"]: d["spec"]["replicas"] for d in ALL
                if d["kind"] == "Deployment"}
    assert replicas == {"identity": 2, "policy": 2, "lb": 2, "events": 1, "k8s-sync": 1}
    kinds = {d["kind"] for d in ALL}
    assert {"StatefulSet", "Job"} <= kinds
    statefulsets = {d["metadata"]["name"] for d in ALL if d["kind"] == "StatefulSet"}
    assert statefulsets == {"nats", "postgres"}


def test_kind_cluster_has_no_default_cni_and_no_kube_proxy() -> None:
    config = documents(REPO / "infra" / "kind" / "kind-config.yaml")[0]
    assert config["networking"]["disableDefaultCNI"] is True
    assert config["networking"]["kubeProxyMode"] == "none"

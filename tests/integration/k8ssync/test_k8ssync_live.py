"""The sync against the API stand-in, feeding the real identity, policy and lb services."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from k8ssync_harness import Cluster, wait_for

from ciliate.bus import Bucket, Bus

StartSync = Callable[[], Awaitable[Cluster]]


def namespace(name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "labels": {"kubernetes.io/metadata.name": name}}}


def pod(ns: str, name: str, ip: str, labels: dict[str, str]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "labels": labels},
            "spec": {"nodeName": "node-1", "containers": [
                {"name": "c", "image": "nginx", "ports": [{"name": "http", "containerPort": 80}]}]},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}}


def cnp(ns: str, name: str, port: Any) -> dict[str, Any]:
    return {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"endpointSelector": {"matchLabels": {"app": "web"}},
                     "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "client"}}],
                                  "toPorts": [{"ports": [{"port": port, "protocol": "TCP"}]}]}]}}


SERVICE = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "prod"},
           "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "protocol": "TCP"}]}}


def condition(obj: dict[str, Any] | None) -> dict[str, Any]:
    conditions = ((obj or {}).get("status") or {}).get("conditions") or [{}]
    return dict(conditions[0])


async def test_cluster_objects_reach_their_owners_and_status_is_written_back(
        cluster: StartSync, nats_url: str) -> None:
    """Listed and watched objects land in identity/policy/lb; a CiliumEndpoint mirrors each
    pod's endpoint; a CNP the policy service refuses is marked invalid in the cluster."""
    api_objects = [namespace("prod"), pod("prod", "web", "10.244.1.5", {"app": "web"}),
                   pod("prod", "client", "10.244.1.6", {"app": "client"}), SERVICE,
                   cnp("prod", "allow-client", "80"), cnp("prod", "bad-port", "99999")]
    c = await cluster()
    for obj in api_objects:
        c.api.put(obj)

    web = await wait_for(lambda: c.stored("identity", "Pod", "prod", "web"), "pod prod/web")
    annotations = web["metadata"]["annotations"]
    assert annotations["ciliate.io/source"] == "kubernetes"
    assert "managedFields" not in web["metadata"]
    assert web["metadata"]["uid"] == c.api.objects[("Pod", "prod", "web")]["metadata"]["uid"]
    await wait_for(lambda: c.stored("policy", "CiliumNetworkPolicy", "prod", "allow-client"),
                   "CNP in the policy service")
    await wait_for(lambda: c.stored("lb", "Service", "prod", "web"), "Service in lb")
    assert await c.stored("policy", "CiliumNetworkPolicy", "prod", "bad-port") is None

    async def refused() -> Any:
        cond = condition(c.api.get("CiliumNetworkPolicy", "prod", "bad-port"))
        return cond if cond.get("status") == "False" else None

    bad = await wait_for(refused, "the invalid CNP's Valid=False condition")
    assert "port" in bad["message"]

    async def accepted() -> bool:
        cond = condition(c.api.get("CiliumNetworkPolicy", "prod", "allow-client"))
        return cond.get("status") == "True"

    await wait_for(accepted, "the valid CNP's Valid=True condition")

    bus = await Bus.connect(nats_url, name="k8s-test")
    try:
        kv = await bus.kv(Bucket.ENDPOINTS)

        async def cep_matches_kv() -> Any:
            entry = await kv.get("prod.web")
            value = entry.value if entry is not None else None
            cep = c.api.get("CiliumEndpoint", "prod", "web")
            if value is None or cep is None:
                return None
            ok = (cep["status"]["identity"]["id"] == value["identity"]
                  and cep["status"]["id"] == value["id"])
            return cep if ok else None

        cep = await wait_for(cep_matches_kv, "CiliumEndpoint prod/web matching KV endpoints")
    finally:
        await bus.close()
    assert cep["status"]["networking"]["addressing"] == [{"ipv4": "10.244.1.5"}]
    assert cep["metadata"]["ownerReferences"][0]["uid"] == web["metadata"]["uid"]

    # Watch events: an update and a deletion propagate, and the deleted pod's CEP goes too.
    c.api.put(pod("prod", "web", "10.244.1.5", {"app": "web", "tier": "front"}))

    async def relabelled() -> bool:
        stored = await c.stored("identity", "Pod", "prod", "web")
        return bool(stored and stored["metadata"]["labels"].get("tier") == "front")

    await wait_for(relabelled, "the label change")
    await wait_for(lambda: c.stored("identity", "Pod", "prod", "client"), "pod prod/client")
    await wait_for(lambda: _exists_async(c, "CiliumEndpoint", "prod", "client"), "client CEP")
    c.api.remove("Pod", "prod", "client")

    async def client_gone() -> bool:
        return (await c.stored("identity", "Pod", "prod", "client") is None
                and c.api.get("CiliumEndpoint", "prod", "client") is None)

    await wait_for(client_gone, "pod deletion and its CEP removal")


async def _exists_async(c: Cluster, kind: str, ns: str, name: str) -> bool:
    return c.api.get(kind, ns, name) is not None


async def test_gone_relists_and_deletes_what_vanished_while_resume_does_not_relist(
        cluster: StartSync) -> None:
    c = await cluster()
    for obj in (namespace("prod"), pod("prod", "a", "10.244.1.10", {"app": "a"}),
                pod("prod", "b", "10.244.1.11", {"app": "b"})):
        c.api.put(obj)
    status, _ = await c.rest("POST", "identity", "/v1/resources", namespace("manual"))
    assert status == 201
    await wait_for(lambda: c.stored("identity", "Pod", "prod", "a"), "pod a")
    await wait_for(lambda: c.stored("identity", "Pod", "prod", "b"), "pod b")

    async def pod_stats() -> dict[str, Any]:
        return dict((await c.sync_status())["kinds"]["Pod"])

    async def bookmarked() -> Any:
        stats = await pod_stats()
        return stats if stats["bookmarks"] > 0 else None

    stats = await wait_for(bookmarked, "a bookmark on the pod watch")
    assert stats["lists"] == 1

    # A watch that simply ends is resumed from the last resourceVersion: no new list.
    c.api.put(pod("prod", "a", "10.244.1.10", {"app": "a", "v": "2"}))
    seen_rv = c.api.rv
    watches_before = len(c.api.requests)
    c.api.drop_watches()

    def resumed() -> bool:
        return any(path == "/api/v1/pods" and q.get("watch") == "1"
                   and int(q.get("resourceVersion", "0")) >= seen_rv
                   for _, path, q in c.api.requests[watches_before:])

    async def resumed_async() -> bool:
        return resumed()

    await wait_for(resumed_async, "a pod watch resumed at the last resourceVersion")
    assert (await pod_stats())["lists"] == 1

    # b is deleted inside a compacted gap: only the relist after 410 Gone can notice.
    c.api.forget("Pod", "prod", "b")
    c.api.put(pod("prod", "c", "10.244.1.12", {"app": "c"}))
    c.api.forget("Pod", "prod", "c")  # created and deleted unseen: nothing to do
    c.api.expire_watches()

    async def relisted() -> Any:
        stats = await pod_stats()
        return stats if stats["lists"] >= 2 and stats["gone"] >= 1 else None

    await wait_for(relisted, "a relist after 410 Gone")
    await wait_for(lambda: _absent(c, "Pod", "prod", "b"), "pod b deleted by the relist")
    assert await c.stored("identity", "Pod", "prod", "a") is not None
    assert await c.stored("identity", "Pod", "prod", "c") is None
    assert await c.stored("identity", "Namespace", "", "manual") is not None, \
        "objects applied by users, not from the cluster, survive a relist"


async def _absent(c: Cluster, kind: str, ns: str, name: str) -> bool:
    return await c.stored("identity", kind, ns, name) is None

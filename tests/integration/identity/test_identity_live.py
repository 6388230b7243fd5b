"""The identity service as it runs: REST in, NATS request/reply, KV out, on real NATS and SQL.

Every test starts the real service in-process (``run_service(SPEC, ...)``) against the test's
own nats-server and a fresh, migrated database (PostgreSQL when it answers).
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from identity_live_support import LiveIdentity, StartIdentity

from ciliate.bus import Bucket, Bus, KVMirror, RequestFailed
from ciliate.bus.subjects import IDENTITY_ALLOCATE, IDENTITY_LOOKUP, IDENTITY_RELEASE
from ciliate.resources.loader import load_documents
from ciliate.testing import wait_until

WORLD_PODS = [f"{ns}.{pod}" for ns in "xyz" for pod in "abc"]
RESERVED_WORLD = 2


def world_docs(shared_dir: Path) -> list[dict[str, Any]]:
    text = (shared_dir / "conformance" / "netpol" / "world.yaml").read_text()
    return load_documents(text)


async def apply_world(live: LiveIdentity, shared_dir: Path) -> list[dict[str, Any]]:
    docs = world_docs(shared_dir)
    for doc in docs:
        await live.apply_ok(doc)
    return docs


def pod(
    namespace: str,
    name: str,
    labels: dict[str, str],
    ip: str | None = None,
    node: str | None = None,
) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {"containers": [{"name": "c", "image": "busybox"}]},
    }
    if node is not None:
        doc["spec"]["nodeName"] = node
    if ip is not None:
        doc["status"] = {"podIP": ip}
    return doc


def namespace(name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "labels": labels or {}}}


async def snapshot(bus: Bus, bucket: Bucket) -> dict[str, Any]:
    return await (await bus.kv(bucket)).items()


async def eventually(check: Callable[[], Awaitable[bool]], deadline: float = 10.0) -> None:
    """Wait for a condition the service reaches by itself (GC), failing after ``deadline``."""
    end = time.monotonic() + deadline
    while not await check():
        assert time.monotonic() < end, "condition not reached in time"
        await asyncio.sleep(0.1)


async def test_world_gives_nine_endpoints_with_distinct_identities(
    start_identity: StartIdentity, bus: Bus, shared_dir: Path
) -> None:
    live = await start_identity()
    docs = await apply_world(live, shared_dir)
    pod_ips = {
        f"{d['metadata']['namespace']}.{d['metadata']['name']}": d["status"]["podIP"]
        for d in docs
        if d["kind"] == "Pod"
    }

    endpoints = await snapshot(bus, Bucket.ENDPOINTS)
    assert sorted(endpoints) == sorted(WORLD_PODS)
    ids = {key: ep["identity"] for key, ep in endpoints.items()}
    assert len(set(ids.values())) == 9
    assert all(256 <= i <= 65535 for i in ids.values())
    xa = endpoints["x.a"]
    assert xa["ips"] == [pod_ips["x.a"]] and xa["node"] == "node-1"
    assert "k8s:pod=a" in xa["labels"]
    assert "k8s:io.kubernetes.pod.namespace=x" in xa["labels"]
    assert "k8s:io.cilium.k8s.namespace.labels.ns=x" in xa["labels"]
    assert {"name": "serve-80-udp", "port": 80, "protocol": "UDP"} in xa["ports"]
    assert len({ep["id"] for ep in endpoints.values()}) == 9

    identities = await snapshot(bus, Bucket.IDENTITIES)
    for ep in endpoints.values():
        assert identities[str(ep["identity"])] == {"id": ep["identity"], "labels": ep["labels"]}
    assert identities[str(RESERVED_WORLD)]["labels"] == ["reserved:world"]

    ipcache = await snapshot(bus, Bucket.IPCACHE)
    assert {v["prefix"]: v["identity"] for v in ipcache.values()} == {
        f"{pod_ips[key]}/32": ids[key] for key in WORLD_PODS
    }
    assert ipcache[pod_ips["x.b"]]["node"] == "node-1"

    # REST views say the same as KV.
    assert await live.get("/v1/endpoints") == sorted(endpoints.values(), key=lambda e: e["id"])
    listed = {i["id"]: i["labels"] for i in await live.get("/v1/identities")}
    assert {RESERVED_WORLD, *ids.values()} <= set(listed)
    one = await live.get(f"/v1/identities/{ids['y.c']}")
    assert one == {"id": ids["y.c"], "labels": endpoints["y.c"]["labels"]}
    assert len(await live.get("/v1/ipcache")) == 9
    pods = await live.get("/v1/pods?namespace=z")
    assert sorted(p["metadata"]["name"] for p in pods["items"]) == ["a", "b", "c"]

    # Re-applying the same world changes nothing: same identities, same endpoint ids.
    await apply_world(live, shared_dir)
    assert await snapshot(bus, Bucket.ENDPOINTS) == endpoints


async def test_a_late_watcher_sees_the_whole_state(
    start_identity: StartIdentity, bus: Bus, shared_dir: Path
) -> None:
    live = await start_identity()
    await apply_world(live, shared_dir)
    await live.apply_ok(pod("x", "extra", {"pod": "extra"}))
    await bus.request(IDENTITY_ALLOCATE, {"labels": [["cidr:10.0.0.0/8", "reserved:world"]]})
    await live.call("DELETE", "/v1/pods/y/b")

    mirrors = {b: KVMirror(await bus.kv(b))
               for b in (Bucket.ENDPOINTS, Bucket.IDENTITIES, Bucket.IPCACHE)}
    tasks = [asyncio.create_task(m.run()) for m in mirrors.values()]
    try:
        await asyncio.wait_for(
            asyncio.gather(*(m.synced.wait() for m in mirrors.values())), 10
        )
        endpoints = mirrors[Bucket.ENDPOINTS].values
        assert sorted(endpoints) == sorted([*(k for k in WORLD_PODS if k != "y.b"), "x.extra"])
        assert endpoints == {f"{e['namespace']}.{e['name']}": e
                             for e in await live.get("/v1/endpoints")}
        ipcache = mirrors[Bucket.IPCACHE].values
        assert sorted(v["prefix"] for v in ipcache.values()) == sorted(
            i["prefix"] for i in await live.get("/v1/ipcache")
        )
        assert "10.0.0.0_8" in ipcache
        identities = mirrors[Bucket.IDENTITIES].values
        for ep in endpoints.values():
            assert identities[str(ep["identity"])]["labels"] == ep["labels"]
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_pods_that_differ_only_by_pod_template_hash_share_an_identity(
    start_identity: StartIdentity, bus: Bus
) -> None:
    live = await start_identity()
    await live.apply_ok(namespace("shop"))
    one = await live.apply_ok(pod("shop", "web-1", {"app": "web", "pod-template-hash": "5d8f"}))
    two = await live.apply_ok(pod("shop", "web-2", {"app": "web", "pod-template-hash": "77aa"}))
    other = await live.apply_ok(pod("shop", "db-1", {"app": "db", "pod-template-hash": "5d8f"}))
    assert one["endpoint"]["identity"] == two["endpoint"]["identity"]
    assert other["endpoint"]["identity"] != one["endpoint"]["identity"]
    endpoints = await snapshot(bus, Bucket.ENDPOINTS)
    assert not any("pod-template-hash" in label for label in endpoints["shop.web-1"]["labels"])
    assert endpoints["shop.web-2"]["pod_labels"]["pod-template-hash"] == "77aa"
    identities = await live.get("/v1/identities")
    shared = [i for i in identities if i["id"] == one["endpoint"]["identity"]]
    assert shared[0]["refcount"] == 2


@pytest.mark.parametrize(
    ("labels", "field"),
    [
        ({"bad key!": "x"}, "metadata.labels.bad key!"),
        ({"app": "-starts-with-dash"}, "metadata.labels.app"),
        ({"UPPER.example.com/x": "y"}, "metadata.labels.UPPER.example.com/x"),
    ],
)
async def test_bad_labels_are_422_naming_the_field_and_store_nothing(
    start_identity: StartIdentity, bus: Bus, labels: dict[str, str], field: str
) -> None:
    live = await start_identity()
    await live.apply_ok(namespace("x"))
    status, body = await live.apply(pod("x", "bad", labels, ip="10.244.1.99"))
    assert status == 422, body
    assert field in [e["field"] for e in body["errors"]]
    status, _ = await live.call("GET", "/v1/pods/x/bad")
    assert status == 404
    assert await snapshot(bus, Bucket.ENDPOINTS) == {}
    assert await snapshot(bus, Bucket.IPCACHE) == {}
    assert [i for i in await live.get("/v1/identities") if i["id"] >= 256] == []
    # The address was not taken either: another pod may have it.
    await live.apply_ok(pod("x", "good", {"app": "ok"}, ip="10.244.1.99"))


async def test_duplicate_pod_ip_is_409_and_stores_nothing(
    start_identity: StartIdentity, bus: Bus
) -> None:
    live = await start_identity()
    await live.apply_ok(namespace("x"))
    first = await live.apply_ok(pod("x", "a", {"app": "a"}, ip="10.244.1.10"))
    status, body = await live.apply(pod("x", "b", {"app": "b"}, ip="10.244.1.10"))
    assert status == 409, body
    assert body["errors"][0]["field"] == "status.podIP"
    assert "x/a" in body["errors"][0]["message"]
    status, _ = await live.call("GET", "/v1/pods/x/b")
    assert status == 404
    assert sorted(await snapshot(bus, Bucket.ENDPOINTS)) == ["x.a"]
    ipcache = await snapshot(bus, Bucket.IPCACHE)
    assert ipcache == {"10.244.1.10": {"prefix": "10.244.1.10/32",
                                       "identity": first["endpoint"]["identity"],
                                       "node": "node-1"}}
    # The identity of the refused pod took no reference.
    refs = {i["id"]: i.get("refcount") for i in await live.get("/v1/identities")}
    assert [i for i, r in refs.items() if i >= 256] == [first["endpoint"]["identity"]]


async def test_deleting_a_namespace_deletes_its_pods_and_releases_identities(
    start_identity: StartIdentity, bus: Bus, shared_dir: Path
) -> None:
    live = await start_identity(CILIATE_IDENTITY_GC_GRACE="1")
    await apply_world(live, shared_dir)
    before = await snapshot(bus, Bucket.ENDPOINTS)
    x_ids = {before[f"x.{p}"]["identity"] for p in "abc"}

    status, body = await live.call("DELETE", "/v1/namespaces/x")
    assert status == 200, body
    assert body["deletedPods"] == ["a", "b", "c"]
    assert (await live.get("/v1/pods?namespace=x"))["items"] == []
    status, _ = await live.call("GET", "/v1/namespaces/x")
    assert status == 404
    endpoints = await snapshot(bus, Bucket.ENDPOINTS)
    assert sorted(endpoints) == [k for k in WORLD_PODS if not k.startswith("x.")]
    ipcache = await snapshot(bus, Bucket.IPCACHE)
    assert {v["identity"] for v in ipcache.values()}.isdisjoint(x_ids)
    assert len(ipcache) == 6
    refs = {i["id"]: i.get("refcount") for i in await live.get("/v1/identities")}
    assert all(refs.get(i, 0) == 0 for i in x_ids)

    # After the grace period the unreferenced identities are collected, from SQL and KV.
    async def collected() -> bool:
        identities = await snapshot(bus, Bucket.IDENTITIES)
        listed = {i["id"] for i in await live.get("/v1/identities")}
        return not any(str(i) in identities for i in x_ids) and listed.isdisjoint(x_ids)

    await eventually(collected)
    listed = {i["id"] for i in await live.get("/v1/identities")}
    assert listed.isdisjoint(x_ids)
    assert {e["identity"] for e in endpoints.values()} <= listed


async def test_an_identity_keeps_its_id_inside_the_grace_period(
    start_identity: StartIdentity, bus: Bus
) -> None:
    live = await start_identity(CILIATE_IDENTITY_GC_GRACE="600")
    await live.apply_ok(namespace("x"))
    first = await live.apply_ok(pod("x", "a", {"app": "a"}))
    status, _ = await live.call("DELETE", "/v1/pods/x/a")
    assert status == 200
    ident = first["endpoint"]["identity"]
    identities = await snapshot(bus, Bucket.IDENTITIES)
    assert str(ident) in identities  # still known to consumers while unreferenced
    # Other label sets never take the id while it is in its grace period ...
    other = await bus.request(
        IDENTITY_ALLOCATE, {"labels": [[f"k8s:app=other{i}"] for i in range(300)]}
    )
    assert ident not in other["ids"]
    # ... and the label set coming back gets it again.
    again = await live.apply_ok(pod("x", "a2", {"app": "a"}))
    assert again["endpoint"]["identity"] == ident


async def test_pods_without_an_address_get_one_from_their_nodes_cidr(
    start_identity: StartIdentity, bus: Bus, shared_dir: Path
) -> None:
    live = await start_identity()
    await apply_world(live, shared_dir)  # node-1's pods are in 10.244.1.0/24
    taken = {ip for e in (await snapshot(bus, Bucket.ENDPOINTS)).values() for ip in e["ips"]}
    on_one = await live.apply_ok(pod("x", "n1", {"app": "n1"}))
    on_two = await live.apply_ok(pod("x", "n2a", {"app": "n2"}, node="node-2"))
    on_two_b = await live.apply_ok(pod("y", "n2b", {"app": "n2"}, node="node-2"))

    def net(result: dict[str, Any]) -> ipaddress.IPv4Network:
        (ip,) = result["endpoint"]["ips"]
        return ipaddress.IPv4Network(f"{ip}/24", strict=False)

    assert on_one["endpoint"]["node"] == "node-1"
    assert net(on_one) == ipaddress.IPv4Network("10.244.1.0/24")
    assert on_one["endpoint"]["ips"][0] not in taken
    assert on_two["endpoint"]["node"] == "node-2"
    assert net(on_two) == net(on_two_b) != net(on_one)
    assert net(on_two).subnet_of(ipaddress.IPv4Network("10.244.0.0/16"))
    assert on_two["endpoint"]["ips"] != on_two_b["endpoint"]["ips"]
    ipcache = await snapshot(bus, Bucket.IPCACHE)
    assert ipcache[on_two["endpoint"]["ips"][0]]["node"] == "node-2"
    # Re-applying keeps the address; deleting frees it for the next pod.
    again = await live.apply_ok(pod("x", "n2a", {"app": "n2"}, node="node-2"))
    assert again["endpoint"]["ips"] == on_two["endpoint"]["ips"]
    await live.call("DELETE", "/v1/pods/x/n2a")
    assert on_two["endpoint"]["ips"][0] not in await snapshot(bus, Bucket.IPCACHE)
    reuse = await live.apply_ok(pod("z", "n2c", {"app": "n2c"}, node="node-2"))
    assert reuse["endpoint"]["ips"] == on_two["endpoint"]["ips"]
    # A pod seen before it was scheduled (default node's address) moves to its node's CIDR
    # once bound, and its old address is freed.
    pending = await live.apply_ok(pod("z", "late", {"app": "late"}))
    assert net(pending) == net(on_one)
    bound = await live.apply_ok(pod("z", "late", {"app": "late"}, node="node-2"))
    assert bound["endpoint"]["node"] == "node-2" and net(bound) == net(on_two)
    ipcache = await snapshot(bus, Bucket.IPCACHE)
    assert pending["endpoint"]["ips"][0] not in ipcache
    assert ipcache[bound["endpoint"]["ips"][0]]["node"] == "node-2"


async def test_allocate_release_and_lookup_in_batches_over_nats(
    start_identity: StartIdentity, bus: Bus
) -> None:
    await start_identity()
    sets = [[f"k8s:app=svc{i}", "k8s:io.kubernetes.pod.namespace=ns"] for i in range(200)]
    first = (await bus.request(IDENTITY_ALLOCATE, {"labels": sets}))["ids"]
    assert len(set(first)) == 200 and all(256 <= i <= 65535 for i in first)
    # Order of labels inside a set does not matter; repeats in one batch get one id.
    again = await bus.request(
        IDENTITY_ALLOCATE, {"labels": [list(reversed(s)) for s in sets[:10]] + [sets[0]]}
    )
    assert again["ids"] == [*first[:10], first[0]]
    reserved = await bus.request(IDENTITY_ALLOCATE, {"labels": [["reserved:world"]]})
    assert reserved["ids"] == [RESERVED_WORLD]
    # The reply comes from the committed allocation; KV publishing follows it.
    async def published() -> dict[str, Any] | None:
        identities = await snapshot(bus, Bucket.IDENTITIES)
        return identities if str(first[5]) in identities else None

    identities = await wait_until(published, 10, "the allocated identity in KV identities")
    assert identities[str(first[5])]["labels"] == sorted(sets[5])

    looked = await bus.request(IDENTITY_LOOKUP, {"labels": [sets[3], ["k8s:app=nobody"]]})
    assert looked["ids"] == [first[3], None]
    by_id = await bus.request(IDENTITY_LOOKUP, {"ids": [first[7], 1, 70000]})
    assert by_id["labels"] == [sorted(sets[7]), ["reserved:host"], None]

    released = await bus.request(IDENTITY_RELEASE, {"ids": [first[0], first[50]]})
    assert released["unreferenced"] == [first[50]]  # one reference, now none
    # first[0] had three references (the first batch and twice in the second): two left.

    with pytest.raises(RequestFailed) as err:
        await bus.request(IDENTITY_ALLOCATE, {"labels": [["k8s:a=b"], "not-a-list"]})
    assert err.value.field == "labels[1]"
    with pytest.raises(RequestFailed) as err:
        await bus.request(IDENTITY_RELEASE, {"ids": ["x"]})
    assert err.value.field == "ids"


async def test_cidr_identities_get_local_ids_and_ipcache_entries(
    start_identity: StartIdentity, bus: Bus
) -> None:
    live = await start_identity()
    labels = [["cidr:10.0.0.0/8", "reserved:world"], ["cidr:192.168.1.0/24", "reserved:world"]]
    reply = await bus.request(
        IDENTITY_ALLOCATE, {"labels": labels, "prefixes": ["10.0.0.0/8", "192.168.1.0/24"]}
    )
    ten, home = reply["ids"]
    assert ten != home and ten > 1 << 24 and home > 1 << 24
    ipcache = await snapshot(bus, Bucket.IPCACHE)
    assert ipcache == {
        "10.0.0.0_8": {"prefix": "10.0.0.0/8", "identity": ten, "node": ""},
        "192.168.1.0_24": {"prefix": "192.168.1.0/24", "identity": home, "node": ""},
    }
    identities = await snapshot(bus, Bucket.IDENTITIES)
    assert identities[str(ten)]["labels"] == ["cidr:10.0.0.0/8", "reserved:world"]
    assert {"prefix": "10.0.0.0/8", "identity": ten, "node": ""} in await live.get("/v1/ipcache")

    # Without "prefixes" the most specific cidr: label is the prefix; the same set, the same id.
    derived = await bus.request(
        IDENTITY_ALLOCATE,
        {"labels": [["cidr:10.0.0.0/8", "reserved:world"],
                    ["cidr:172.16.0.0/12", "cidr:172.16.0.0/16", "reserved:world"]]},
    )
    assert derived["ids"][0] == ten
    sixteen = derived["ids"][1]
    ipcache = await snapshot(bus, Bucket.IPCACHE)
    assert ipcache["172.16.0.0_16"]["identity"] == sixteen

    # Two references to 10.0.0.0/8 now: the entry goes with the last one.
    await bus.request(IDENTITY_RELEASE, {"ids": [ten, home]})
    ipcache = await snapshot(bus, Bucket.IPCACHE)
    assert "10.0.0.0_8" in ipcache and "192.168.1.0_24" not in ipcache
    await bus.request(IDENTITY_RELEASE, {"ids": [ten]})
    ipcache = await snapshot(bus, Bucket.IPCACHE)
    assert sorted(ipcache) == ["172.16.0.0_16"]
    assert {i["prefix"] for i in await live.get("/v1/ipcache")} == {"172.16.0.0/16"}
    # Allocating it again inside the grace period brings back the same id and the entry.
    back = await bus.request(IDENTITY_ALLOCATE, {"labels": labels[:1], "prefixes": ["10.0.0.0/8"]})
    assert back["ids"] == [ten]
    assert (await snapshot(bus, Bucket.IPCACHE))["10.0.0.0_8"]["identity"] == ten


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"labels": [["cidr:10.0.0.0/8"]], "prefixes": ["10.1.2.3/8"]}, "prefixes[0]"),
        ({"labels": [["cidr:10.0.0.0/8"]], "prefixes": ["nonsense"]}, "prefixes[0]"),
        ({"labels": [["k8s:app=x"]], "prefixes": ["10.0.0.0/8"]}, "prefixes[0]"),
        ({"labels": [["cidr:10.0.0.0/8"]], "prefixes": []}, "prefixes"),
        ({"labels": [["cidr:10.0.0.0/8"], ["cidr:11.0.0.0/8"]], "prefixes": [None, 5]},
         "prefixes[1]"),
    ],
)
async def test_bad_cidr_requests_name_the_field_and_change_nothing(
    start_identity: StartIdentity, bus: Bus, payload: dict[str, Any], field: str
) -> None:
    live = await start_identity()
    with pytest.raises(RequestFailed) as err:
        await bus.request(IDENTITY_ALLOCATE, payload)
    assert err.value.field == field
    assert await snapshot(bus, Bucket.IPCACHE) == {}
    assert [i for i in await live.get("/v1/identities") if i["id"] >= 256] == []


async def test_two_replicas_agree(
    start_identity: StartIdentity, bus: Bus, shared_dir: Path
) -> None:
    """Two replicas on one database: pods applied through either, batches allocated through
    the queue group in parallel; one label set, one id, whoever answered."""
    one = await start_identity(node="node-1")
    two = await start_identity(node="node-1")
    docs = world_docs(shared_dir)
    namespaces = [d for d in docs if d["kind"] == "Namespace"]
    pods = [d for d in docs if d["kind"] == "Pod"]
    for doc in namespaces:
        await (one if doc["metadata"]["name"] != "y" else two).apply_ok(doc)
    results = await asyncio.gather(
        *((one if i % 2 else two).apply_ok(doc) for i, doc in enumerate(pods))
    )
    assert len({r["endpoint"]["identity"] for r in results}) == 9

    sets = [[f"k8s:app=shared{i}"] for i in range(300)]

    async def batch(seed: int) -> dict[str, int]:
        order = sets[seed * 37 % 300:] + sets[: seed * 37 % 300]
        chunk = order[:150] if seed % 2 else order[150:] + order[:50]
        reply = await bus.request(IDENTITY_ALLOCATE, {"labels": chunk}, timeout=20)
        return {s[0]: i for s, i in zip(chunk, reply["ids"], strict=True)}

    replies = await asyncio.gather(*(batch(seed) for seed in range(12)))
    merged: dict[str, int] = {}
    for reply in replies:
        for key, ident in reply.items():
            assert merged.setdefault(key, ident) == ident, key
    assert len(set(merged.values())) == len(merged)

    listed_one = {i["id"]: i["labels"] for i in await one.get("/v1/identities")}
    listed_two = {i["id"]: i["labels"] for i in await two.get("/v1/identities")}
    assert listed_one == listed_two
    assert len([i for i in listed_one if i >= 256]) == 9 + len(merged)
    assert await one.get("/v1/endpoints") == await two.get("/v1/endpoints")
    endpoints = await snapshot(bus, Bucket.ENDPOINTS)
    assert sorted(endpoints) == sorted(WORLD_PODS)
    assert len({e["id"] for e in endpoints.values()}) == 9

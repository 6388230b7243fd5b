"""The lb service end to end: real NATS, SQLite, the service in-process; Services applied over
REST, pod endpoints published to KV ``endpoints`` as the identity service does, results read
back from KV ``lb``."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from ciliate.bus import KV, Bucket, Bus
from ciliate.config import Settings
from ciliate.runner import run_service
from ciliate.stack.ports import free_port
from services.lb.core.maglev import table_from_bytes
from services.lb.service import SPEC

DEADLINE = 10.0

# The conformance world's `pod: a` pods (shared/conformance/netpol/world.yaml).
A_PODS = {"x": "10.244.1.10", "y": "10.244.2.10", "z": "10.244.3.10"}
PORTS = [{"name": f"serve-{p}-{proto.lower()}", "port": p, "protocol": proto}
         for p in (80, 81) for proto in ("TCP", "UDP")]


def endpoint_record(namespace: str, name: str, ip: str, *, ready: bool = True,
                    labels: dict[str, str] | None = None, ident: int = 1) -> dict[str, Any]:
    """A KV ``endpoints`` value as the identity service writes it (shared contract)."""
    pod_labels = labels or {"pod": name}
    return {"id": ident, "namespace": namespace, "name": name,
            "labels": [f"k8s:{k}={v}" for k, v in pod_labels.items()], "identity": 1000 + ident,
            "ips": [ip], "node": "node-1", "ports": PORTS, "pod_labels": pod_labels,
            "ready": ready}


async def eventually(check: Callable[[], Awaitable[Any]], what: str) -> Any:
    """Poll ``check`` until it returns something truthy or the deadline passes."""
    deadline = time.monotonic() + DEADLINE
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


@dataclass
class Stack:
    url: str
    http: aiohttp.ClientSession
    lb: KV
    endpoints: KV

    async def apply(self, doc: dict[str, Any]) -> tuple[int, Any]:
        async with self.http.post(f"{self.url}/v1/resources", json=doc) as resp:
            return resp.status, await resp.json(content_type=None)

    async def delete(self, kind: str, namespace: str, name: str) -> int:
        async with self.http.delete(f"{self.url}/v1/resources/{kind}/{namespace}/{name}") as r:
            return r.status

    async def list(self, kind: str) -> list[dict[str, Any]]:
        async with self.http.get(f"{self.url}/v1/resources/{kind}") as resp:
            items: list[dict[str, Any]] = (await resp.json())["items"]
            return items

    async def svc(self, namespace: str, name: str) -> dict[str, Any] | None:
        entry = await self.lb.get(f"svc.{namespace}.{name}")
        return None if entry is None else dict(entry.value)

    async def table_ids(self, key: str) -> set[int]:
        entry = await self.lb.get(key)
        assert entry is not None, key
        return {int(i) for i in table_from_bytes(entry.value["table"])}


@pytest.fixture
async def stack(nats_url: str, sqlite_url: str, tmp_path: Any) -> AsyncIterator[Stack]:
    port = free_port()
    settings = Settings(nats_url=nats_url, db_url=sqlite_url, node="node-1",
                        state_dir=tmp_path, http_port=port, replica="t")
    stop = asyncio.Event()
    task = asyncio.create_task(run_service(SPEC, settings, stop))
    bus = await Bus.connect(nats_url, name="lb-test")
    url = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as http:
        async def up() -> bool:
            if task.done():
                task.result()
            try:
                async with http.get(f"{url}/healthz") as resp:
                    return resp.status == 200
            except aiohttp.ClientError:
                return False

        await eventually(up, "the lb service to serve")
        yield Stack(url, http, await bus.kv(Bucket.LB), await bus.kv(Bucket.ENDPOINTS))
    stop.set()
    await asyncio.wait_for(task, DEADLINE)
    await bus.close()


def service(name: str, namespace: str = "x", **spec: Any) -> dict[str, Any]:
    spec.setdefault("ports", [{"name": "http", "port": 80, "protocol": "TCP"}])
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": namespace}, "spec": spec}


def slice_over_a_pods(terminating: str | None = None) -> dict[str, Any]:
    endpoints = []
    for ns, ip in sorted(A_PODS.items()):
        conditions = {"ready": True}
        if ns == terminating:
            conditions = {"ready": False, "serving": True, "terminating": True}
        endpoints.append({"addresses": [ip], "conditions": conditions, "nodeName": "node-1",
                          "targetRef": {"kind": "Pod", "namespace": ns, "name": "a"}})
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "all-a-1", "namespace": "x",
                         "labels": {"kubernetes.io/service-name": "all-a"}},
            "addressType": "IPv4", "endpoints": endpoints,
            "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}


async def test_three_a_pods_terminating_and_delete(stack: Stack) -> None:
    status, body = await stack.apply(service("all-a"))
    assert status == 201, body
    cluster_ip = body["object"]["spec"]["clusterIP"]
    assert cluster_ip.startswith("10.")
    status, body = await stack.apply(slice_over_a_pods())
    assert status == 201, body

    async def three_active() -> dict[str, Any] | None:
        value = await stack.svc("x", "all-a")
        if value and len([b for b in value["backends"] if b["state"] == "active"]) == 3:
            return value
        return None

    value = await eventually(three_active, "three active backends")
    assert {b["address"] for b in value["backends"]} == set(A_PODS.values())
    assert value["frontends"][0]["address"] == cluster_ip
    assert value["algorithm"] == "maglev"
    table_key = value["tables"]["http"]
    ids = {b["id"] for b in value["backends"]}
    assert await stack.table_ids(table_key) == ids

    status, body = await stack.apply(slice_over_a_pods(terminating="y"))
    assert status == 200, body

    async def one_terminating() -> dict[str, Any] | None:
        value = await stack.svc("x", "all-a")
        states = {b["address"]: b["state"] for b in (value or {}).get("backends", [])}
        return value if states.get(A_PODS["y"]) == "terminating" else None

    value = await eventually(one_terminating, "the y pod to be terminating")
    leaving = next(b["id"] for b in value["backends"] if b["address"] == A_PODS["y"])
    new_key = value["tables"]["http"]
    assert new_key != table_key
    assert await stack.table_ids(new_key) == ids - {leaving}

    async def old_table_gone() -> bool:
        # Deletions are published after the puts that stop referring to the table.
        return await stack.lb.get(table_key) is None

    await eventually(old_table_gone, "the unreferenced table to be deleted")

    assert await stack.delete("Service", "x", "all-a") == 200

    async def gone() -> bool:
        return await stack.svc("x", "all-a") is None and await stack.lb.get(new_key) is None

    await eventually(gone, "the Service's KV entries to be deleted")


async def test_selector_backends_follow_endpoint_readiness(stack: Stack) -> None:
    for ns, ip in A_PODS.items():
        await stack.endpoints.put(f"{ns}.a", endpoint_record(ns, "a", ip))
    await stack.endpoints.put("x.b", endpoint_record("x", "b", "10.244.1.20"))
    status, body = await stack.apply(service(
        "sel", selector={"pod": "a"},
        ports=[{"name": "web", "port": 8080, "protocol": "TCP", "targetPort": "serve-81-tcp"},
               {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 80}]))
    assert status == 201, body

    async def backends() -> list[tuple[str, int, str, str]]:
        value = await stack.svc("x", "sel") or {}
        return sorted((b["address"], b["port"], b["protocol"], b["state"])
                      for b in value.get("backends", []))

    async def only_x_a() -> bool:
        return await backends() == [("10.244.1.10", 80, "UDP", "active"),
                                    ("10.244.1.10", 81, "TCP", "active")]

    await eventually(only_x_a, "the x/a pod (named and numeric targetPort) as backend")

    await stack.endpoints.put("x.a", endpoint_record("x", "a", A_PODS["x"], ready=False))

    async def none_left() -> bool:
        value = await stack.svc("x", "sel")
        return value is not None and not value["backends"] and value["tables"] == {
            "web": None, "dns": None}

    await eventually(none_left, "the not-ready pod to leave the backends")

    await stack.endpoints.put("x.d", endpoint_record("x", "d", "10.244.1.40",
                                                     labels={"pod": "a"}, ident=4))

    async def new_pod() -> bool:
        return [b[0] for b in await backends()] == ["10.244.1.40", "10.244.1.40"]

    await eventually(new_pod, "a newly matching pod to become a backend")


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"ports": [{"name": "a", "port": 80, "protocol": "ICMP"}]}, "spec.ports[0].protocol"),
        ({"ports": [{"name": "a", "port": 70000}]}, "spec.ports[0].port"),
        ({"ports": [{"name": "a", "port": 80}, {"name": "a", "port": 81}]},
         "spec.ports[1].name"),
        ({"clusterIP": "192.168.0.10", "ports": [{"port": 80}]}, "spec.clusterIP"),
        ({"type": "NodePort", "ports": [{"port": 80, "nodePort": 80}]},
         "spec.ports[0].nodePort"),
    ],
)
async def test_bad_input_is_422_naming_the_field(stack: Stack, spec: dict[str, Any],
                                                 field: str) -> None:
    status, body = await stack.apply(service("bad", **spec))
    assert status == 422, body
    assert field in [e["field"] for e in body["errors"]], body
    assert await stack.list("Service") == []
    assert await stack.svc("x", "bad") is None


async def test_address_conflicts_are_409_and_allocations_kept(stack: Stack) -> None:
    status, body = await stack.apply(service("one", clusterIP="10.96.0.50", type="NodePort"))
    assert status == 201, body
    node_port = body["object"]["spec"]["ports"][0]["nodePort"]
    assert 30000 <= node_port <= 32767
    status, body = await stack.apply(service("two", clusterIP="10.96.0.50"))
    assert status == 409, body
    assert body["errors"][0]["field"] == "spec.clusterIP"
    status, body = await stack.apply(service(
        "three", type="NodePort", ports=[{"port": 80, "nodePort": node_port}]))
    assert status == 409, body
    assert body["errors"][0]["field"] == "spec.ports[0].nodePort"
    assert [s["metadata"]["name"] for s in await stack.list("Service")] == ["one"]
    # Re-applying the same file keeps the allocated node port.
    status, body = await stack.apply(service("one", clusterIP="10.96.0.50", type="NodePort"))
    assert status == 200, body
    assert body["object"]["spec"]["ports"][0]["nodePort"] == node_port
    # Once deleted, the address is free again.
    assert await stack.delete("Service", "x", "one") == 200
    status, body = await stack.apply(service("two", clusterIP="10.96.0.50"))
    assert status == 201, body

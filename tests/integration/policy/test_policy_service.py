"""The policy service over real NATS and SQLite: what the datapath reads from KV ``policy``."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from policy_harness import SHARED, TOKEN, StackFactory, conformance_world, wait_for

from ciliate.bus import Bucket
from ciliate.client import ClientContext
from ciliate.labels import CIDR_IDENTITY_BASE
from ciliate.policymap import ENTRY, LAYOUT, iter_entries, readable
from services.policy.cli import policy
from services.policy.core.compile import CompileResult
from services.policy.core.kv import decode_policy
from services.policy.core.world import World, matrix

CASES = sorted((SHARED / "cases").glob("*.yaml")) if SHARED.is_dir() else []
KEYS = ((80, 6, "80/TCP"), (81, 6, "81/TCP"), (80, 17, "80/UDP"), (81, 17, "81/UDP"))
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"missing {SHARED}")


def kv_matrix(values: dict[str, Any], world: World, proto: int, port: int) -> dict[str, Any]:
    """Reachability computed from the published KV values only (as the datapath would load)."""
    policies = {int(k): decode_policy(v) for k, v in values.items() if not v.get("overflow")}
    return matrix(CompileResult(policies, [], {}), world, proto, port)


def docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def ref_path(doc: dict[str, Any]) -> str:
    cluster = doc["kind"] == "CiliumClusterwideNetworkPolicy"
    ns = doc["metadata"].get("namespace", "_" if cluster else "default")
    return f"/v1/resources/{doc['kind']}/{ns}/{doc['metadata']['name']}"


@needs_shared
async def test_every_conformance_case_is_published_as_its_expected_matrix(
    policy_stack: StackFactory,
) -> None:
    stack = await policy_stack()
    world = conformance_world()
    await stack.publish_world(world)
    pods = {str(p.identity) for p in world.pods.values()}
    await wait_for(lambda: _has_keys(stack, pods), what="an entry for every pod identity")
    for case in CASES:
        expected = json.loads((SHARED / "expected" / f"{case.stem}.json").read_text())
        for doc in docs(case):
            status, body = await stack.rest("POST", "/v1/resources", doc)
            assert status in (200, 201), (case.name, body)

        async def matches(expected: dict[str, Any] = expected) -> bool:
            values = await stack.policy_kv()
            return all(kv_matrix(values, world, proto, port) == expected[key]
                       for port, proto, key in KEYS)

        await wait_for(matches, what=f"{case.name} published as its expected matrix")
        for doc in docs(case):
            status, _ = await stack.rest("DELETE", ref_path(doc))
            assert status == 200
    # Every policy deleted: no identity enforces anything any more.
    async def open_again() -> bool:
        values = await stack.policy_kv()
        return all(not any(v["enforce"].values()) and not v["entries"]
                   for k, v in values.items() if k in pods)

    await wait_for(open_again, what="all policies gone from KV")


async def _has_keys(stack: Any, keys: set[str]) -> bool:
    return keys <= set(await stack.policy_kv())


@needs_shared
async def test_kv_value_follows_the_contract_and_revision_counts_up(
    policy_stack: StackFactory,
) -> None:
    stack = await policy_stack()
    world = conformance_world()
    await stack.publish_world(world)
    xa = str(world.pods["x/a"].identity)
    await wait_for(lambda: _has_keys(stack, {xa}), what="x/a published")
    first = (await stack.policy_kv())[xa]
    assert first == {"identity": int(xa), "revision": 1, "layout": LAYOUT,
                     "enforce": {"ingress": False, "egress": False}, "entries": b"",
                     "cookies": []}
    doc = docs(SHARED / "cases" / "06-ports.yaml")[0]
    assert (await stack.rest("POST", "/v1/resources", doc))[0] == 201

    async def second() -> Any:
        value = (await stack.policy_kv())[xa]
        return value if value["revision"] == 2 else None

    value = await wait_for(second, what="x/a revision 2")
    assert value["enforce"]["ingress"] is True
    assert isinstance(value["entries"], bytes) and len(value["entries"]) % ENTRY.size == 0
    entries = list(iter_entries(value))
    assert entries and all(e.cookies for e in entries)
    assert (0, "ingress", 6, 81, 16) in {e[:5] for e in entries}
    # Unrelated identities are not rewritten: y/a keeps revision 1.
    ya = str(world.pods["y/a"].identity)
    assert (await stack.policy_kv())[ya]["revision"] == 1


async def test_bad_policy_is_422_naming_the_field_and_nothing_is_stored(
    policy_stack: StackFactory,
) -> None:
    stack = await policy_stack()
    bad = {
        "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
        "metadata": {"name": "bad", "namespace": "x"},
        "spec": {"endpointSelector": {},
                 "ingress": [{"toPorts": [{"ports": [{"port": "90", "endPort": 80,
                                                       "protocol": "TCP"}]}]}],
                 "egress": [{"toCIDR": ["10.0.0.300/8"]}]},
    }
    status, body = await stack.rest("POST", "/v1/resources", bad)
    assert status == 422, body
    fields = {e["field"] for e in body["errors"]}
    assert any("endPort" in f for f in fields), fields
    assert any("toCIDR" in f for f in fields), fields
    status, listing = await stack.rest("GET", "/v1/resources/CiliumNetworkPolicy")
    assert status == 200 and listing["items"] == []


@needs_shared
async def test_dry_run_prints_the_reachability_diff_and_stores_nothing(
    policy_stack: StackFactory,
) -> None:
    stack = await policy_stack()
    world = conformance_world()
    await stack.publish_world(world)
    pods = {str(p.identity) for p in world.pods.values()}
    await wait_for(lambda: _has_keys(stack, pods), what="the world published")
    deny = docs(SHARED / "cases" / "01-default-deny-ingress.yaml")[0]
    status, body = await stack.rest("POST", "/v1/resources", deny, params={"dryRun": "true"})
    assert status == 200, body
    diff = body["diff"]
    ns = deny["metadata"]["namespace"]
    assert f"- y/a -> {ns}/a 80/TCP" in diff
    assert f"- z/c -> {ns}/b 81/UDP" in diff
    assert all(line.startswith("- ") for line in diff)  # a deny only takes away
    assert not any(line.split(" -> ")[1].split()[0].split("/")[0] != ns for line in diff)
    status, listing = await stack.rest("GET", "/v1/resources/NetworkPolicy")
    assert listing["items"] == []
    values = await stack.policy_kv()
    assert not any(values[k]["enforce"]["ingress"] for k in pods)


@needs_shared
async def test_new_identity_gets_entries_and_cidr_prefixes_go_to_the_allocator(
    policy_stack: StackFactory,
) -> None:
    stack = await policy_stack()
    world = conformance_world()
    await stack.publish_world(world)
    cnp = {
        "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
        "metadata": {"name": "to-net", "namespace": "x"},
        "spec": {"endpointSelector": {"matchLabels": {"app": "new"}},
                 "egress": [{"toCIDR": ["192.0.2.0/24"],
                             "toPorts": [{"ports": [{"port": "443", "protocol": "TCP"}]}]}]},
    }
    assert (await stack.rest("POST", "/v1/resources", cnp))[0] == 201
    await wait_for(lambda: _truthy(stack.identity.requests), what="an identity.allocate request")
    request = stack.identity.requests[0]
    assert request["prefixes"] == ["192.0.2.0/24"]
    assert request["labels"] == [["cidr:192.0.2.0/24", "reserved:world"]]
    cidr_id = stack.identity.assigned["cidr:192.0.2.0/24;reserved:world"]
    assert cidr_id > CIDR_IDENTITY_BASE
    new_id = 4000
    labels = ["k8s:app=new", "k8s:io.kubernetes.pod.namespace=x"]
    kv = await stack.bus.kv(Bucket.IDENTITIES)
    await kv.put(str(new_id), {"id": new_id, "labels": labels})

    async def published() -> Any:
        return (await stack.policy_kv()).get(str(new_id))

    value = await wait_for(published, what="the new identity's entries")
    assert value["enforce"] == {"ingress": False, "egress": True}
    assert [(e.peer, e.direction, e.proto, e.port) for e in iter_entries(value)] == [
        (cidr_id, "egress", 6, 443)]
    await kv.delete(str(new_id))

    async def gone() -> bool:
        return str(new_id) not in await stack.policy_kv()

    await wait_for(gone, what="the identity's key deleted")


async def _truthy(value: Any) -> Any:
    return value


@needs_shared
async def test_unanswered_cidr_allocation_is_visible_and_retried(
    policy_stack: StackFactory,
) -> None:
    stack = await policy_stack(allocate=False)
    world = conformance_world()
    await stack.publish_world(world)
    cnp = {
        "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
        "metadata": {"name": "to-net", "namespace": "x"},
        "spec": {"endpointSelector": {}, "egress": [{"toCIDR": ["198.51.100.0/24"]}]},
    }
    assert (await stack.rest("POST", "/v1/resources", cnp))[0] == 201

    async def pending() -> Any:
        return (await stack.status()).get("cidr_pending")

    info = await wait_for(pending, what="cidr_pending in the status")
    assert info["prefixes"] == ["198.51.100.0/24"]
    await stack.serve_allocate()
    xa = str(world.pods["x/a"].identity)

    async def enforced() -> bool:
        value = (await stack.policy_kv()).get(xa)
        return bool(value and value["enforce"]["egress"])

    await wait_for(enforced, timeout=15, what="publication after the allocator came back")
    assert "cidr_pending" not in await stack.status()


@needs_shared
async def test_overflow_is_refused_loudly_never_truncated(policy_stack: StackFactory) -> None:
    stack = await policy_stack(capacity=3)
    world = conformance_world()
    await stack.publish_world(world)
    xa = str(world.pods["x/a"].identity)
    await wait_for(lambda: _has_keys(stack, {xa}), what="x/a published before the policy")
    allow_all_ports = {
        "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
        "metadata": {"name": "many", "namespace": "x"},
        "spec": {"endpointSelector": {"matchLabels": {"pod": "a"}},
                 "ingress": [{"fromEndpoints": [{}],
                              "toPorts": [{"ports": [{"port": "1000", "endPort": 1100,
                                                      "protocol": "TCP"}]}]}]},
    }
    assert (await stack.rest("POST", "/v1/resources", allow_all_ports))[0] == 201

    async def overflow() -> Any:
        return (await stack.status()).get("overflow")

    messages = await wait_for(overflow, what="overflow in the status")
    assert any(f"identity {xa}" in m for m in messages)
    value = (await stack.policy_kv())[xa]
    # x/a had a (small) value before: it is kept as it was, not replaced by a truncated map.
    assert value["revision"] == 1 and value["entries"] == b"" and not value.get("overflow")
    # A new identity with no previous value gets the fail-closed marker.
    kv = await stack.bus.kv(Bucket.IDENTITIES)
    labels = ["k8s:io.kubernetes.pod.namespace=x", "k8s:pod=a", "k8s:extra=1"]
    await kv.put("5000", {"id": 5000, "labels": labels})

    async def marker() -> Any:
        return (await stack.policy_kv()).get("5000")

    fresh = await wait_for(marker, what="the overflow marker for a new identity")
    assert fresh["entries"] == b"" and fresh["enforce"] == {"ingress": True, "egress": True}
    assert fresh["overflow"]["capacity"] == 3 and fresh["overflow"]["entries"] > 3


@needs_shared
async def test_cli_policy_get_and_policy_entries(
    policy_stack: StackFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stack = await policy_stack()
    world = conformance_world()
    await stack.publish_world(world)
    doc = docs(SHARED / "cases" / "06-ports.yaml")[0]
    assert (await stack.rest("POST", "/v1/resources", doc))[0] == 201
    xa = world.pods["x/a"].identity

    async def enforced() -> bool:
        value = (await stack.policy_kv()).get(str(xa))
        return bool(value and value["enforce"]["ingress"])

    await wait_for(enforced, what="x/a enforced")
    ClientContext(str(tmp_path), stack.nats_url, TOKEN,
                  services={"policy": [stack.base_url]}).save()
    monkeypatch.setenv("CILIATE_STATE_DIR", str(tmp_path))
    runner = CliRunner()
    got = await asyncio.to_thread(runner.invoke, policy, ["get", "-o", "json"])
    assert got.exit_code == 0, got.output
    assert [i["metadata"]["name"] for i in json.loads(got.output)] == [doc["metadata"]["name"]]
    got = await asyncio.to_thread(runner.invoke, policy, ["entries", "x/a"])
    assert got.exit_code == 0, got.output
    lines = got.output.splitlines()
    assert lines[0].split("   ")[0] == "POLICY" and "LABELS (source:key[=value])" in lines[0]
    assert any(line.startswith("Allow") and "Ingress" in line and "reserved:host" in line
               for line in lines), got.output
    got = await asyncio.to_thread(runner.invoke, policy, ["entries", str(xa), "-o", "json"])
    shown = json.loads(got.output)  # entries as dicts, not the packed bytes
    assert shown == readable((await stack.policy_kv())[str(xa)])
    assert {"peer", "direction", "proto", "port", "port_prefixlen", "deny", "proxy_port",
            "cookies"} <= set(shown["entries"][0])

"""The conformance world on two nodes; every shared case enforced by the tc programs and checked
over real TCP and UDP traffic on ports 80 and 81 between all pods, equal to the expected matrix
and to the policy engine's offline matrix."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest

from ciliate.resources.core import Pod
from ciliate.resources.loader import load_resources
from services.datapath.core.plan import desired_state
from services.datapath.loader import Datapath
from services.datapath.probe import Probe, run_probes
from services.datapath.sandbox import DevCluster
from services.policy.core.kv import encode_policy
from services.policy.core.world import build_world, compile_world, matrix

SHARED = Path(__file__).resolve().parents[3] / ".." / "shared" / "conformance" / "netpol"
CASES = sorted((SHARED / "cases").glob("*.yaml")) if SHARED.is_dir() else []
KEYS = ("80/TCP", "81/TCP", "80/UDP", "81/UDP")
PROTO_NUMBERS = {"TCP": 6, "UDP": 17}

pytestmark = [
    pytest.mark.privileged,
    pytest.mark.skipif(not SHARED.is_dir(), reason=f"missing {SHARED}"),
]


def _kv_payloads(world_resources: list[Any], case_resources: list[Any], placement: dict[str, str]
                 ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[int, dict[str, Any]]]:
    """What identity and policy would publish to KV for this world and case."""
    world = build_world(world_resources)
    _, result = compile_world(world, case_resources)
    assert result.ok, result.overflows
    ips = {f"{p.metadata.namespace}/{p.metadata.name}": p.status.podIP
           for p in world_resources if isinstance(p, Pod)}
    endpoints = []
    ipcache = []
    for i, (key, wp) in enumerate(sorted(world.pods.items()), start=1):
        endpoints.append({"id": i, "namespace": wp.namespace, "name": wp.name,
                          "identity": wp.identity, "ips": [ips[key]], "node": placement[key]})
        ipcache.append({"prefix": f"{ips[key]}/32", "identity": wp.identity,
                        "node": placement[key]})
    policies = {ident: encode_policy(pol, 1) for ident, pol in result.policies.items()}
    return endpoints, ipcache, policies


def _offline(world_resources: list[Any], case_resources: list[Any]) -> dict[str, Any]:
    world = build_world(world_resources)
    _, result = compile_world(world, case_resources)
    return {k: matrix(result, world, PROTO_NUMBERS[k.split("/")[1]], int(k.split("/")[0]))
            for k in KEYS}


async def _measure(cluster: DevCluster) -> dict[str, dict[str, dict[str, bool]]]:
    pods = cluster.pods()
    probes: list[tuple[str, str, str, Probe]] = []
    for key in KEYS:
        port, proto = key.split("/")
        for src in sorted(pods):
            for dst in sorted(pods):
                if src != dst:
                    probes.append((key, src, dst, Probe(pods[src].netns, pods[dst].ip,
                                                        int(port), proto)))
    results = await run_probes([p for *_, p in probes], timeout=1.5)
    out: dict[str, dict[str, dict[str, bool]]] = {k: {} for k in KEYS}
    for (key, src, dst, _), ok in zip(probes, results, strict=True):
        out[key].setdefault(src, {})[dst] = ok
    return out


def test_conformance_cases_over_real_traffic(
    cluster: DevCluster, datapaths: dict[str, Datapath]
) -> None:
    world_resources = load_resources((SHARED / "world.yaml").read_text())
    placement: dict[str, str] = {}
    for i, pod in enumerate(p for p in world_resources if isinstance(p, Pod)):
        key = f"{pod.metadata.namespace}/{pod.metadata.name}"
        node = ("n1", "n2")[i % 2]
        placement[key] = node
        ports = [c.containerPort for ct in pod.spec.containers for c in ct.ports]
        sandbox = cluster.add_pod(node, pod.metadata.namespace or "default", pod.metadata.name,
                                  str(pod.status.podIP), sorted(set(ports)), sorted(set(ports)))
        datapaths[node].attach(sandbox.ifname, cluster.nodes[node].netns)

    started = time.monotonic()
    failures: dict[str, Any] = {}
    for case in CASES:
        case_resources = load_resources(case.read_text())
        endpoints, ipcache, policies = _kv_payloads(world_resources, case_resources, placement)
        for node, dp in datapaths.items():
            dp.sync(desired_state(node=node, endpoints=endpoints, ipcache=ipcache,
                                  policies=policies))
            dp.ct_flush()  # each case starts like a fresh deployment: no earlier connections
        measured = asyncio.run(_measure(cluster))
        expected = json.loads((SHARED / "expected" / f"{case.stem}.json").read_text())
        assert _offline(world_resources, case_resources) == expected, case.stem
        for key in KEYS:
            for src, row in expected[key].items():
                for dst, want in row.items():
                    if measured[key][src][dst] != want:
                        failures.setdefault(case.stem, []).append(f"{key} {src}->{dst} "
                                                                  f"want {want}")
    assert not failures, json.dumps(failures, indent=1)
    assert time.monotonic() - started < 600

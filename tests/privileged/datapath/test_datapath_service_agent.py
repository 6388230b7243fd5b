"""The datapath agent as deployed: two in-process agents (node-1, node-2) fed only through the
KV buckets, as identity and policy publish them. Checks sandboxes, real TCP traffic against
the shared expected matrices for cases switched by a KV `policy` update, drop flows on
``flows.<node>`` in Hubble's JSON shape, and an agent restart mid-traffic."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pyroute2 import netns

from ciliate.bus import Bucket, Bus
from ciliate.bus.subjects import FLOWS_ALL
from ciliate.config import Settings
from ciliate.flows.codec import envelope_items
from ciliate.flows.jsonpb import flow_json
from ciliate.flows.model import Flow
from ciliate.resources.core import Pod
from ciliate.resources.loader import load_resources
from ciliate.runner import run_service
from ciliate.stack.ports import free_port
from services.datapath.core.plan import desired_state
from services.datapath.loader import unpin
from services.datapath.maps import PIN_ROOT, NodeMaps, pin_dir
from services.datapath.probe import Probe, in_netns, run_probes
from services.datapath.sandbox import (
    CGROUP_ROOT,
    PodSandbox,
    bridge_netns_name,
    delete_pod,
    node_netns_name,
    read_record,
    remove_node,
)
from services.datapath.service import SPEC
from services.policy.core.kv import encode_policy
from services.policy.core.world import build_world, compile_world

SHARED = Path(__file__).resolve().parents[3] / ".." / "shared" / "conformance" / "netpol"
NODES = ("node-1", "node-2")
KEYS = ("80/TCP", "81/TCP")

pytestmark = [
    pytest.mark.privileged,
    # pyroute2 0.9 leaves an un-awaited coroutine behind when a sync IPRoute closes in a thread.
    pytest.mark.filterwarnings("ignore:Exception ignored in. <coroutine object AsyncNetlinkSocket"
                               ".setup_endpoint:pytest.PytestUnraisableExceptionWarning"),
    pytest.mark.skipif(not SHARED.is_dir(), reason=f"missing {SHARED}"),
]


async def _until(cond: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        got = cond()
        if got:
            return got
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


@dataclass
class Scene:
    """What identity and policy would have published for the conformance world."""

    world_resources: list[Any]
    placement: dict[str, str] = field(default_factory=dict)
    ips: dict[str, str] = field(default_factory=dict)
    endpoints: dict[str, dict[str, Any]] = field(default_factory=dict)
    ipcache: dict[str, dict[str, Any]] = field(default_factory=dict)
    identities: dict[str, dict[str, Any]] = field(default_factory=dict)
    identity_of: dict[str, int] = field(default_factory=dict)

    @classmethod
    def build(cls) -> Scene:
        res = load_resources((SHARED / "world.yaml").read_text())
        scene = cls(res)
        world = build_world(res)
        pods = [p for p in res if isinstance(p, Pod)]
        for i, pod in enumerate(pods):
            key = f"{pod.metadata.namespace}/{pod.metadata.name}"
            scene.placement[key] = NODES[i % 2]
            scene.ips[key] = str(pod.status.podIP)
        for i, (key, wp) in enumerate(sorted(world.pods.items()), start=1):
            ip = scene.ips[key]
            labels = sorted(str(lbl) for lbl in wp.labels)
            scene.identity_of[key] = wp.identity
            scene.endpoints[f"{wp.namespace}.{wp.name}"] = {
                "id": i, "namespace": wp.namespace, "name": wp.name, "labels": labels,
                "identity": wp.identity, "ips": [ip], "node": scene.placement[key],
                "ports": [{"name": f"serve-{p}-{pr.lower()}", "port": p, "protocol": pr}
                          for p in (80, 81) for pr in ("TCP", "UDP")],
                "pod_labels": {}, "ready": True}
            scene.ipcache[f"{ip}_32"] = {"prefix": f"{ip}/32", "identity": wp.identity,
                                         "node": scene.placement[key]}
            scene.identities[str(wp.identity)] = {"id": wp.identity, "labels": labels}
        return scene

    def policies(self, case: str) -> dict[str, dict[str, Any]]:
        """KV `policy` values for a case, compiled by the policy engine."""
        world = build_world(self.world_resources)
        case_res = load_resources((SHARED / "cases" / f"{case}.yaml").read_text())
        _, result = compile_world(world, case_res)
        assert result.ok, result.overflows
        return {str(i): encode_policy(p, 1) for i, p in result.policies.items()}


@dataclass
class Harness:
    nats_url: str
    state_dir: Path
    salt: str
    pin_root: Path
    bus: Bus
    scene: Scene
    agents: dict[str, tuple[asyncio.Task[None], asyncio.Event]] = field(default_factory=dict)
    flows: list[dict[str, Any]] = field(default_factory=list)
    lost: int = 0

    def settings(self, node: str, teardown: bool) -> Settings:
        return Settings(
            nats_url=self.nats_url, node=node, state_dir=self.state_dir, dev_mode=True,
            http_port=free_port(), replica=f"{node}-{secrets.token_hex(2)}",
            extra={"dev_cluster": self.salt, "bpf_pin_root": str(self.pin_root),
                   "bpf_map_sizes": "small", "dev_teardown": "1" if teardown else "0",
                   "metrics_interval": "0.5"})

    def start(self, node: str, teardown: bool) -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(run_service(SPEC, self.settings(node, teardown), stop))
        self.agents[node] = (task, stop)

    async def stop(self, node: str) -> None:
        task, stop = self.agents.pop(node)
        stop.set()
        await asyncio.wait_for(task, 60)

    async def put_policies(self, case: str) -> dict[str, dict[str, Any]]:
        kv = await self.bus.kv(Bucket.POLICY)
        want = self.scene.policies(case)
        for key in set(await kv.items()) - set(want):
            await kv.delete(key)
        for key, value in want.items():
            await kv.put(key, value)
        return want

    def maps_hold(self, policies: dict[str, dict[str, Any]]) -> bool:
        """Both nodes' pinned maps equal what the contract says they should hold."""
        pols = {int(k): v for k, v in policies.items()}
        for node in NODES:
            d = pin_dir(node, self.pin_root)
            if not (d / "cil_policy").exists():
                return False
            want = desired_state(node=node, endpoints=self.scene.endpoints.values(),
                                 ipcache=self.scene.ipcache.values(), policies=pols)
            maps = NodeMaps.open(d)
            try:
                if ({k: v for k, v, _, _ in maps.policy_entries()} != want.policy
                        or maps.endpoint_entries() != want.endpoints
                        or maps.ipcache_entries() != want.ipcache):
                    return False
            finally:
                maps.close()
        return True

    def pods_ready(self) -> bool:
        try:
            recs = [read_record(self.state_dir, *k.split("/")) for k in self.scene.ips]
        except LookupError:
            return False
        return all(r.netns in netns.listnetns() for r in recs)

    def pod_netns(self, key: str) -> str:
        return read_record(self.state_dir, *key.split("/")).netns

    async def measure(self) -> dict[str, dict[str, dict[str, bool]]]:
        pods = sorted(self.scene.ips)
        probes: list[tuple[str, str, str, Probe]] = []
        for key in KEYS:
            port, proto = key.split("/")
            for src in pods:
                for dst in pods:
                    if src != dst:
                        probes.append((key, src, dst, Probe(self.pod_netns(src),
                                                            self.scene.ips[dst], int(port),
                                                            proto)))
        results = await run_probes([p for *_, p in probes], timeout=1.5)
        out: dict[str, dict[str, dict[str, bool]]] = {k: {} for k in KEYS}
        for (key, src, dst, _), ok in zip(probes, results, strict=True):
            out[key].setdefault(src, {})[dst] = ok
        return out

    async def expect(self, case: str, attempts: int = 3) -> None:
        """Real traffic equals the expected matrix; a mismatch is re-measured (a probe can time
        out on a loaded 2-core machine) and reported if it persists."""
        want = _expected(case)
        for _ in range(attempts):
            got = await self.measure()
            if got == want:
                return
        diff = [f"{k} {s}->{d}: got {ok}" for k in KEYS for s, row in got[k].items()
                for d, ok in row.items() if want[k][s][d] != ok]
        raise AssertionError(f"{case}: {diff}")

    async def probe(self, src: str, dst: str, port: int = 80) -> bool:
        p = Probe(self.pod_netns(src), self.scene.ips[dst], port, "TCP")
        return (await run_probes([p], timeout=1.0))[0]


def _cleanup(h: Harness) -> None:
    """Remove whatever the agents left (they tear down themselves on success)."""
    pods_dir = h.state_dir / "pods"
    for rec_file in pods_dir.glob("*.json") if pods_dir.is_dir() else []:
        ns, _, name = rec_file.stem.partition(".")
        with contextlib.suppress(Exception):
            delete_pod(PodSandbox(read_record(h.state_dir, ns, name)), state_dir=h.state_dir)
    for node in NODES:
        with contextlib.suppress(Exception):
            remove_node(h.salt, node)
    if bridge_netns_name(h.salt) in netns.listnetns():
        netns.remove(bridge_netns_name(h.salt))
    for node in NODES:
        with contextlib.suppress(OSError):
            (CGROUP_ROOT / (h.salt + node)).rmdir()
    if h.pin_root.exists():
        for d in h.pin_root.iterdir():
            unpin(d)
        h.pin_root.rmdir()


@pytest.fixture
async def harness(nats_url: str, tmp_path: Path) -> AsyncIterator[Harness]:
    salt = "s" + secrets.token_hex(3)
    bus = await Bus.connect(nats_url, name="test-identity-policy")
    h = Harness(nats_url, tmp_path / "state", salt, PIN_ROOT / f"test-{salt}", bus,
                Scene.build())
    h.state_dir.mkdir(parents=True)

    async def on_batch(payload: Any) -> None:
        h.flows.extend(envelope_items(payload))
        h.lost += int(payload.get("lost", 0))

    await bus.subscribe(FLOWS_ALL, on_batch)
    for bucket, values in ((Bucket.IDENTITIES, h.scene.identities),
                           (Bucket.IPCACHE, h.scene.ipcache),
                           (Bucket.ENDPOINTS, h.scene.endpoints)):
        kv = await bus.kv(bucket)
        for key, value in values.items():
            await kv.put(key, value)
    try:
        yield h
    finally:
        for node in list(h.agents):
            with contextlib.suppress(Exception):
                await h.stop(node)
        await bus.close()
        _cleanup(h)


def _expected(case: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((SHARED / "expected" / f"{case}.json").read_text())
    return {k: data[k] for k in KEYS}


def _drops(h: Harness, reason: str) -> list[dict[str, Any]]:
    """TCP drops for ``reason``, as Hubble's JSON."""
    out = []
    for w in list(h.flows):
        j = flow_json(Flow.from_wire(w))
        if (j.get("verdict") == "DROPPED" and j.get("drop_reason_desc") == reason
                and "TCP" in j.get("l4", {})):
            out.append(j)
    return out


async def test_agents_enforce_kv_policy_publish_flows_and_survive_restart(
    harness: Harness,
) -> None:
    h = harness
    policies = await h.put_policies("01-default-deny-ingress")
    for node in NODES:
        h.start(node, teardown=node != "node-1")  # node-1 restarts: its first life keeps state
    await _until(h.pods_ready, 90, "nine pod sandboxes")
    await _until(lambda: h.maps_hold(policies), 30, "maps for case 01")
    await h.expect("01-default-deny-ingress")

    # Default deny refused those: flows on flows.<node> with Hubble's names and both sides.
    denied = await _until(lambda: _drops(h, "POLICY_DENIED"), 10, "POLICY_DENIED flows")
    d = denied[0]
    assert d["drop_reason"] == 133 and d["traffic_direction"] == "INGRESS"
    assert d["node_name"] in NODES and d["event_type"]["type"] == 1
    assert d["l4"]["TCP"]["destination_port"] in (80, 81)
    by_ip = {ip: key for key, ip in h.scene.ips.items()}
    src, dst = by_ip[d["IP"]["source"]], by_ip[d["IP"]["destination"]]
    assert d["source"]["identity"] == h.scene.identity_of[src]
    assert d["destination"]["identity"] == h.scene.identity_of[dst]
    assert d["destination"]["pod_name"] == dst.split("/")[1]
    assert d["destination"]["namespace"] == dst.split("/")[0]
    assert "k8s:pod=" + dst.split("/")[1] in d["destination"]["labels"]

    # Switch the case by the KV alone: a deny rule now refuses namespace y into x.
    policies = await h.put_policies("14-cnp-deny")
    await _until(lambda: h.maps_hold(policies), 30, "maps for case 14")
    await h.expect("14-cnp-deny")
    deny = await _until(lambda: _drops(h, "POLICY_DENY"), 10, "POLICY_DENY flows")
    assert deny[0]["drop_reason"] == 181
    assert by_ip[deny[0]["IP"]["source"]].startswith("y/")
    assert deny[0]["source"]["identity"] == h.scene.identity_of[by_ip[deny[0]["IP"]["source"]]]

    # Restart node-1's agent mid-traffic: z/a -> x/a (on node-1) stays up, y/b -> x/a denied.
    assert h.scene.placement["x/a"] == "node-1"
    with in_netns(h.pod_netns("z/a")):
        conn = socket.create_connection((h.scene.ips["x/a"], 80), timeout=3)
    try:
        assert conn.recv(64) == b"x/a\n"
        await h.stop("node-1")
        conn.sendall(b"while-down")
        assert conn.recv(64) == b"while-down"
        assert not await h.probe("y/b", "x/a")
        h.start("node-1", teardown=True)
        for i in range(5):  # traffic keeps flowing while the new agent starts and resyncs
            msg = f"during-{i}".encode()
            conn.sendall(msg)
            assert await asyncio.to_thread(conn.recv, 64) == msg
            assert not await h.probe("y/b", "x/a")
        await _until(lambda: h.maps_hold(policies), 30, "maps after restart")
        conn.sendall(b"after-restart")
        assert conn.recv(64) == b"after-restart"
        assert not await h.probe("y/b", "x/a")
        assert await h.probe("z/b", "x/a")
    finally:
        conn.close()
    assert h.lost == 0

    # Teardown (the dev default): the agents remove pods, nodes, bridge and pinned maps.
    for node in NODES:
        await h.stop(node)
    leftover = set(netns.listnetns()) & {node_netns_name(h.salt, n) for n in NODES}
    assert not leftover
    assert bridge_netns_name(h.salt) not in netns.listnetns()
    assert not any(pin_dir(n, h.pin_root).exists() for n in NODES)

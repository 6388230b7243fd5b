"""Service load balancing through the datapath agent as deployed: two in-process agents fed
only through KV (`endpoints`, `ipcache`, `identities`, `lb`), real connections from a client
pod's namespace and cgroup, and the 158 drop on ``flows.<node>`` in Hubble's JSON."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import socket
import subprocess
import sys
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
from ciliate.flows.jsonpb import get_flows_response
from ciliate.runner import run_service
from ciliate.stack.ports import free_port
from services.datapath.lb.maps import lb_pin_dir
from services.datapath.loader import unpin
from services.datapath.maps import PIN_ROOT, pin_dir
from services.datapath.probe import in_netns
from services.datapath.sandbox import (
    PodSandbox,
    bridge_netns_name,
    delete_pod,
    enter_cgroup,
    node_cgroup,
    node_ip_for,
    node_netns_name,
    read_record,
    remove_node,
)
from services.datapath.service import SPEC

REPO_ROOT = Path(__file__).resolve().parents[3]
if str(REPO_ROOT) not in sys.path:  # bench.kube_proxy.kv renders KV `lb` (not installed)
    sys.path.insert(0, str(REPO_ROOT))
from bench.kube_proxy.kv import Backend, Frontend, Service, render  # noqa: E402

PEER = REPO_ROOT / "tests" / "privileged" / "datapath_lb" / "lb_peer.py"
NODES = ("node-1", "node-2")
MAGLEV_M = 251
VIP, EMPTY_VIP, NODEPORT = "10.96.77.10", "10.96.77.20", 31077
PODS = {"b1": ("node-1", "10.244.1.11"), "b2": ("node-1", "10.244.1.12"),
        "c1": ("node-1", "10.244.1.20")}

pytestmark = [
    pytest.mark.privileged,
    pytest.mark.filterwarnings("ignore:Exception ignored in. <coroutine object AsyncNetlinkSocket"
                               ".setup_endpoint:pytest.PytestUnraisableExceptionWarning"),
]


async def _until(cond: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        got = cond()
        if asyncio.iscoroutine(got):
            got = await got
        if got:
            return got
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


def lb_bucket() -> dict[str, dict[str, Any]]:
    """What the lb service would publish: web over b1 and b2, and a Service whose ClusterIP
    and NodePort have no backends."""
    web = Service("default", "web", [Frontend(1, VIP, 80, port_name="http")],
                  [Backend(10 + i, PODS[n][1], 80, "node-1", port_name="http")
                   for i, n in enumerate(("b1", "b2"))])
    empty = Service("default", "empty", [Frontend(2, EMPTY_VIP, 80, port_name="http"),
                                         Frontend(3, "0.0.0.0", NODEPORT, "NodePort",
                                                  port_name="http")],
                    [], type="NodePort")
    return render([web, empty], m=MAGLEV_M)


@dataclass
class Harness:
    nats_url: str
    state_dir: Path
    salt: str
    pin_root: Path
    bus: Bus
    agents: dict[str, tuple[asyncio.Task[None], asyncio.Event]] = field(default_factory=dict)
    flows: list[dict[str, Any]] = field(default_factory=list)

    def start(self, node: str) -> None:
        settings = Settings(
            nats_url=self.nats_url, node=node, state_dir=self.state_dir, dev_mode=True,
            http_port=free_port(), replica=f"{node}-{secrets.token_hex(2)}",
            extra={"dev_cluster": self.salt, "bpf_pin_root": str(self.pin_root),
                   "bpf_map_sizes": "small", "dev_teardown": "1", "l7_proxy": "0",
                   "bpf_lb_maglev_table_size": str(MAGLEV_M)})
        stop = asyncio.Event()
        self.agents[node] = (asyncio.create_task(run_service(SPEC, settings, stop)), stop)

    async def stop(self, node: str) -> None:
        task, stop = self.agents.pop(node)
        stop.set()
        await asyncio.wait_for(task, 60)

    def pod(self, name: str) -> PodSandbox | None:
        try:
            rec = read_record(self.state_dir, "default", name)
        except LookupError:
            return None
        return PodSandbox(rec) if rec.netns in netns.listnetns() else None

    def client(self, ip: str, port: int, n: int) -> dict[str, Any]:
        """``n`` TCP connects from c1 (its namespace and cgroup, so the socket LB applies)."""
        pod = self.pod("c1")
        assert pod is not None
        out = subprocess.run(
            ["ip", "netns", "exec", pod.netns, sys.executable, str(PEER), "tcp", ip, str(port),
             str(n)],
            preexec_fn=lambda: enter_cgroup(pod.record.cgroup), capture_output=True,
            check=True, timeout=60)
        result: dict[str, Any] = json.loads(out.stdout)
        return result

    def drops_158(self) -> list[dict[str, Any]]:
        out = []
        for w in list(self.flows):
            flow = get_flows_response(w).get("flow", {})
            if flow.get("drop_reason_desc") == "SERVICE_BACKEND_NOT_FOUND":
                out.append(flow)
        return out


def _cleanup(h: Harness) -> None:
    pods_dir = h.state_dir / "pods"
    for rec_file in pods_dir.glob("*.json") if pods_dir.is_dir() else []:
        ns, _, name = rec_file.stem.partition(".")
        with contextlib.suppress(Exception):
            delete_pod(PodSandbox(read_record(h.state_dir, ns, name)), state_dir=h.state_dir)
    for node in NODES:
        with contextlib.suppress(Exception):
            remove_node(h.salt, node)
        with contextlib.suppress(OSError):
            node_cgroup(h.salt, node).rmdir()
    if bridge_netns_name(h.salt) in netns.listnetns():
        netns.remove(bridge_netns_name(h.salt))
    if h.pin_root.exists():
        for d in h.pin_root.iterdir():
            unpin(d)
        h.pin_root.rmdir()


@pytest.fixture
async def harness(nats_url: str, tmp_path: Path) -> AsyncIterator[Harness]:
    salt = "b" + secrets.token_hex(3)
    bus = await Bus.connect(nats_url, name="test-lb-agent")
    h = Harness(nats_url, tmp_path / "state", salt, PIN_ROOT / f"test-{salt}", bus)
    h.state_dir.mkdir(parents=True)

    async def on_batch(payload: Any) -> None:
        h.flows.extend(envelope_items(payload))

    await bus.subscribe(FLOWS_ALL, on_batch)
    endpoints, ipcache, identities = {}, {}, {}
    for i, (name, (node, ip)) in enumerate(sorted(PODS.items()), start=1):
        ident = 5000 + i
        labels = [f"k8s:app={name}", "k8s:io.kubernetes.pod.namespace=default"]
        endpoints[f"default.{name}"] = {
            "id": i, "namespace": "default", "name": name, "labels": labels, "identity": ident,
            "ips": [ip], "node": node, "ports": [{"name": "http", "port": 80, "protocol": "TCP"}],
            "pod_labels": {"app": name}, "ready": True}
        ipcache[f"{ip}_32"] = {"prefix": f"{ip}/32", "identity": ident, "node": node}
        identities[str(ident)] = {"id": ident, "labels": labels}
    for bucket, values in ((Bucket.IDENTITIES, identities), (Bucket.IPCACHE, ipcache),
                           (Bucket.ENDPOINTS, endpoints), (Bucket.LB, lb_bucket())):
        kv = await bus.kv(bucket)
        for key in set(await kv.items()) - set(values):
            await kv.delete(key)  # another test's leftovers must not reach these agents
        for key, value in values.items():
            await kv.put(key, value)
    try:
        yield h
    finally:
        for node in list(h.agents):
            with contextlib.suppress(Exception):
                await h.stop(node)
        with contextlib.suppress(Exception):
            kv = await bus.kv(Bucket.LB)
            for key in await kv.items():
                await kv.delete(key)
        await bus.close()
        _cleanup(h)


def _connect_from(netns_name: str, ip: str, port: int) -> str:
    """One TCP connect from a node's namespace (outside its cgroup: only the tc LB sees it)."""
    with in_netns(netns_name):
        s = socket.socket()
    s.settimeout(1.0)
    try:
        s.connect((ip, port))
        return "connected"
    except OSError as exc:
        return type(exc).__name__
    finally:
        s.close()


async def test_agent_load_balances_kv_services_and_reports_158(harness: Harness) -> None:
    h = harness
    for node in NODES:
        h.start(node)
    await _until(lambda: all(h.pod(n) for n in PODS), 90, "three pod sandboxes")

    # ClusterIP over two backends: the client pod reaches both by the VIP.
    seen: dict[str, int] = {}

    def both_answer() -> bool:
        res = h.client(VIP, 80, 20)
        for answer, count in res["answers"].items():
            seen[answer] = seen.get(answer, 0) + count
        return set(seen) == {"default/b1", "default/b2"}

    await _until(lambda: asyncio.to_thread(both_answer), 60, f"b1 and b2 behind {VIP}")
    assert set(seen) == {"default/b1", "default/b2"}

    # The policy datapath's traces say the conntrack state: NEW into the backend, REPLY back.
    backend_ips = {PODS["b1"][1], PODS["b2"][1]}

    def traces(reason: str) -> list[dict[str, Any]]:
        out = []
        for w in list(h.flows):
            f = get_flows_response(w).get("flow", {})
            if f.get("event_type", {}).get("type") == 4 and f.get("trace_reason") == reason:
                out.append(f)
        return out

    new = await _until(lambda: [f for f in traces("NEW")
                                if f["IP"]["destination"] in backend_ips], 15, "NEW traces")
    assert new[0]["is_reply"] is False and new[0]["l4"]["TCP"]["destination_port"] == 80
    reply = await _until(lambda: [f for f in traces("REPLY")
                                  if f["IP"]["source"] in backend_ips], 15, "REPLY traces")
    assert reply[0]["is_reply"] is True and reply[0]["IP"]["destination"] == PODS["c1"][1]

    # No backends: connect() is refused at once, by the socket LB.
    assert h.client(EMPTY_VIP, 80, 3) == {"answers": {}, "errors": {"ECONNREFUSED": 3},
                                          "peers": []}

    # NodePort traffic from another node to that Service: dropped by node-1's tc LB with 158.
    node2 = node_netns_name(h.salt, "node-2")
    node1_ip = node_ip_for("node-1")
    assert await asyncio.to_thread(_connect_from, node2, node1_ip, NODEPORT) != "connected"
    drops = await _until(lambda: [f for f in h.drops_158() if f["event_type"]["type"] == 1],
                         15, "a DROP flow with reason 158")
    d = drops[0]
    assert d["drop_reason"] == 158 and d["verdict"] == "DROPPED"
    assert d["node_name"] == "node-1"
    assert d["IP"]["source"] == node_ip_for("node-2")
    assert d["l4"]["TCP"]["destination_port"] == NODEPORT
    socks = [f for f in h.drops_158() if f["event_type"]["type"] == 7]
    assert socks and socks[0]["IP"]["destination"] == EMPTY_VIP

    # Backends appear in KV: the same frontend works without an agent restart.
    kv = await h.bus.kv(Bucket.LB)
    web = lb_bucket()["svc.default.web"]
    empty = dict(lb_bucket()["svc.default.empty"])
    empty["backends"] = web["backends"]
    empty["tables"] = web["tables"]
    await kv.put("svc.default.empty", empty)

    def empty_answers() -> bool:
        return not h.client(EMPTY_VIP, 80, 2)["errors"]

    await _until(lambda: asyncio.to_thread(empty_answers), 30, "backends for the empty VIP")

    # Dev teardown removes the LB pins with the rest.
    for node in NODES:
        await h.stop(node)
    assert not any(lb_pin_dir(n, h.pin_root).exists() or pin_dir(n, h.pin_root).exists()
                   for n in NODES)

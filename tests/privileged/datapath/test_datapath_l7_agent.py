"""The Star Wars scene through the datapath agent as deployed: only KV (endpoints, ipcache,
identities, policy with an L7 rule) goes in; the agent makes the pods (the deathstar's pod
server plays its image, docker.io/cilium/starwars, as in `ciliate up`), attaches the datapath
and the L7 redirect, runs the node's HTTP proxy, and publishes its L7 flows on flows.<node>."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from pyroute2 import netns

from ciliate.bus import Bucket, Bus
from ciliate.bus.subjects import flows as flows_subject
from ciliate.config import Settings
from ciliate.flows.codec import envelope_items
from ciliate.flows.model import Flow
from ciliate.flows.tables import FlowType, Verdict
from ciliate.runner import run_service
from ciliate.stack.ports import free_port
from services.datapath.loader import unpin
from services.datapath.maps import PIN_ROOT
from services.datapath.sandbox import (
    CGROUP_ROOT,
    PodSandbox,
    bridge_netns_name,
    delete_pod,
    read_record,
    remove_node,
)
from services.datapath.service import SPEC

NODE = "node-1"
IPS = {"deathstar-1": "10.244.19.10", "tiefighter": "10.244.19.11", "xwing": "10.244.19.12"}
IDS = {"deathstar-1": 1000, "tiefighter": 1001, "xwing": 1002}
LABELS = {"deathstar-1": ["k8s:class=deathstar", "k8s:org=empire"],
          "tiefighter": ["k8s:class=tiefighter", "k8s:org=empire"],
          "xwing": ["k8s:class=xwing", "k8s:org=alliance"]}
POLICY = {"identity": 1000, "revision": 1, "enforce": {"ingress": True, "egress": False},
          "entries": [{"peer": 1001, "direction": "ingress", "proto": 6, "port": 80,
                       "port_prefixlen": 16, "deny": False, "proxy_port": 15001,
                       "cookies": ["CiliumNetworkPolicy/default/rule1/ingress[0]"],
                       "l7": {"http": [{"method": "POST", "path": "/v1/request-landing"}]}}]}

CLIENT = r"""
import http.client, sys
c = http.client.HTTPConnection(sys.argv[1], 80, timeout=3)
try:
    c.request(sys.argv[2], sys.argv[3], body=b"", headers={"Host": "deathstar.default"})
    r = c.getresponse()
    print(r.status, r.read().decode().strip())
except OSError as e:
    print("ERR", type(e).__name__)
"""

pytestmark = [
    pytest.mark.privileged,
    pytest.mark.filterwarnings("ignore:Exception ignored in. <coroutine object AsyncNetlinkSocket"
                               ".setup_endpoint:pytest.PytestUnraisableExceptionWarning"),
]


async def _until(cond: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while not (got := cond()):
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)
    return got


def _pods_ready(state_dir: Path) -> bool:
    try:
        recs = [read_record(state_dir, "default", n) for n in IPS]
    except LookupError:
        return False
    return all(r.netns in netns.listnetns() for r in recs)


async def _request(pod_ns: str, method: str, path: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", pod_ns, sys.executable, "-c", CLIENT, IPS["deathstar-1"],
        method, path, stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    return out.decode().strip()


@pytest.fixture
async def scene(nats_url: str, tmp_path: Path) -> AsyncIterator[dict[str, Any]]:
    salt = "l" + secrets.token_hex(3)
    state_dir, pin_root = tmp_path / "state", PIN_ROOT / f"test-{salt}"
    state_dir.mkdir()
    bus = await Bus.connect(nats_url, name="test-l7")
    flows: list[dict[str, Any]] = []

    async def on_batch(payload: Any) -> None:
        flows.extend(envelope_items(payload))

    await bus.subscribe(flows_subject(NODE), on_batch)
    puts = {
        Bucket.IDENTITIES: {str(IDS[n]): {"id": IDS[n], "labels": LABELS[n]} for n in IPS},
        Bucket.IPCACHE: {f"{IPS[n]}_32": {"prefix": f"{IPS[n]}/32", "identity": IDS[n],
                                          "node": NODE} for n in IPS},
        Bucket.ENDPOINTS: {f"default.{n}": {
            "id": i + 1, "namespace": "default", "name": n, "labels": LABELS[n],
            "identity": IDS[n], "ips": [IPS[n]], "node": NODE, "pod_labels": {}, "ready": True,
            **({"ports": [{"name": "", "port": 80, "protocol": "TCP"}],
                "images": ["docker.io/cilium/starwars"]} if n == "deathstar-1" else {})}
            for i, n in enumerate(IPS)},
        Bucket.POLICY: {"1000": POLICY},
    }
    for bucket, values in puts.items():
        kv = await bus.kv(bucket)
        for key, value in values.items():
            await kv.put(key, value)
    settings = Settings(
        nats_url=nats_url, node=NODE, state_dir=state_dir, dev_mode=True,
        http_port=free_port(), replica=f"{NODE}-{secrets.token_hex(2)}",
        extra={"dev_cluster": salt, "bpf_pin_root": str(pin_root), "bpf_map_sizes": "small",
               "dev_teardown": "1"})
    stop = asyncio.Event()
    agent = asyncio.create_task(run_service(SPEC, settings, stop))
    try:
        await _until(lambda: _pods_ready(state_dir) or agent.done(), 90, "three pod sandboxes")
        assert not agent.done(), agent
        pods = {n: read_record(state_dir, "default", n).netns for n in IPS}
        yield {"pods": pods, "flows": flows}
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(agent, 60)
        await bus.close()
        _cleanup(state_dir, salt, pin_root)


def _cleanup(state_dir: Path, salt: str, pin_root: Path) -> None:
    """Whatever the agent left (it tears down by itself on success)."""
    pods_dir = state_dir / "pods"
    for rec_file in pods_dir.glob("*.json") if pods_dir.is_dir() else []:
        ns, _, name = rec_file.stem.partition(".")
        with contextlib.suppress(Exception):
            delete_pod(PodSandbox(read_record(state_dir, ns, name)), state_dir=state_dir)
    with contextlib.suppress(Exception):
        remove_node(salt, NODE)
    if bridge_netns_name(salt) in netns.listnetns():
        netns.remove(bridge_netns_name(salt))
    with contextlib.suppress(OSError):
        (CGROUP_ROOT / (salt + NODE)).rmdir()
    if pin_root.exists():
        for d in pin_root.iterdir():
            unpin(d)
        pin_root.rmdir()


def _l7_requests(flows: list[dict[str, Any]]) -> list[tuple[str, int, str, str]]:
    out = []
    for w in list(flows):
        f = Flow.from_wire(w)
        if f.type == FlowType.L7 and not f.is_reply and f.l7 and f.l7.http:
            out.append((f.l7.http.method, f.verdict, f.source.pod_name, f.destination.pod_name))
    return out


async def test_agent_enforces_l7_policy_from_kv_and_publishes_l7_flows(
    scene: dict[str, Any],
) -> None:
    pods = scene["pods"]
    assert await _request(pods["tiefighter"], "POST", "/v1/request-landing") == "200 Ship landed"
    assert await _request(pods["tiefighter"], "PUT", "/v1/exhaust-port") == "403 Access denied"
    assert (await _request(pods["xwing"], "POST", "/v1/request-landing")).startswith("ERR")
    want = [("POST", Verdict.FORWARDED, "tiefighter", "deathstar-1"),
            ("PUT", Verdict.DROPPED, "tiefighter", "deathstar-1")]
    await _until(lambda: _l7_requests(scene["flows"]) == want, 10, "L7 flows on flows.node-1")

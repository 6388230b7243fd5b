"""The Star Wars scene through the real redirect: tiefighter lands, the exhaust port is denied
by the L7 proxy (403), xwing cannot connect at all. Directly to the deathstar pod IP (the
policy service and socket LB are not in this loop); L7 flows are taken from the proxy's emit.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

if os.geteuid() != 0:
    pytest.skip("needs root (network namespaces, BPF)", allow_module_level=True)

from ciliate.flows.model import Flow
from ciliate.flows.tables import FlowType, Verdict
from services.datapath.core.plan import desired_state
from services.datapath.loader import Datapath, MapSizes, unpin
from services.datapath.maps import PIN_ROOT
from services.datapath.proxy.core.policy import PolicyView
from services.datapath.proxy.http_proxy import HTTPProxy
from services.datapath.proxy.loader import ProxyDatapath
from services.datapath.sandbox import DevCluster

SMALL = MapSizes(ct_tcp=4096, ct_any=4096, ipcache=1024, endpoints=256, policy=8192,
                 events_pages=16)
REPO = Path(__file__).resolve().parents[3]
IPS = {"deathstar-1": "10.244.9.10", "tiefighter": "10.244.9.11", "xwing": "10.244.9.12"}
IDS = {"deathstar-1": 1000, "tiefighter": 1001, "xwing": 1002}
PROXY_PORT = 15001

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


@pytest.fixture
def scene(tmp_path: Path) -> Iterator[dict[str, Any]]:
    salt = "l7" + secrets.token_hex(3)
    pin_root = PIN_ROOT / f"test-{salt}"
    cluster = DevCluster(salt=salt, state_dir=tmp_path / "state")
    dp: Datapath | None = None
    pdp: ProxyDatapath | None = None
    server: subprocess.Popen[bytes] | None = None
    node_ns = ""
    try:
        node_ns = cluster.add_node("n1").netns
        pods = {name: cluster.add_pod("n1", "default", name, ip, [], [])
                for name, ip in IPS.items()}
        server = subprocess.Popen(
            ["ip", "netns", "exec", pods["deathstar-1"].netns, sys.executable, "-m",
             "services.datapath.proxy.demo", "0.0.0.0", "80"],
            cwd=REPO, stdout=subprocess.PIPE)
        assert server.stdout is not None and server.stdout.readline().strip() == b"ready"
        endpoints = [{"id": i + 1, "identity": IDS[n], "ips": [IPS[n]], "node": "n1",
                      "namespace": "default", "name": n, "labels": [f"k8s:name={n}"]}
                     for i, n in enumerate(IPS)]
        ipcache = [{"prefix": f"{IPS[n]}/32", "identity": IDS[n]} for n in IPS]
        policy = {"identity": 1000, "revision": 1, "enforce": {"ingress": True, "egress": False},
                  "entries": [{"peer": 1001, "direction": "ingress", "proto": 6, "port": 80,
                               "port_prefixlen": 16, "deny": False, "proxy_port": PROXY_PORT,
                               "cookies": ["CiliumNetworkPolicy/default/rule1/ingress[0]"],
                               "l7": {"http": [{"method": "POST",
                                                "path": "/v1/request-landing"}]}}]}
        dp = Datapath("n1", sizes=SMALL, pin_root=pin_root)
        for pod in pods.values():
            dp.attach(pod.ifname, netns=node_ns)
        dp.sync(desired_state(node="n1", endpoints=endpoints, ipcache=ipcache,
                              policies={1000: policy}))
        pdp = ProxyDatapath("n1", sizes=SMALL, pin_root=pin_root)
        pdp.setup_routing(node_ns)
        for pod in pods.values():
            pdp.attach(pod.ifname, netns=node_ns)
        view = PolicyView(node="n1")
        for ep in endpoints:
            view.set_endpoint(f"default.{ep['name']}", ep)
        for entry in ipcache:
            view.set_ipcache(str(entry["prefix"]).replace("/", "_"), entry)
        view.set_policy("1000", policy)
        yield {"pods": pods, "view": view, "node_ns": node_ns, "pdp": pdp}
    finally:
        if server is not None:
            server.kill()
            server.wait()
            if server.stdout is not None:
                server.stdout.close()
        if pdp is not None:
            pdp.close()
        if dp is not None:
            dp.close()
        cluster.destroy()
        if pin_root.exists():
            for d in pin_root.iterdir():
                unpin(d)
            pin_root.rmdir()



async def request(pod_ns: str, method: str, path: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", pod_ns, sys.executable, "-c", CLIENT, IPS["deathstar-1"],
        method, path, stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    return out.decode().strip()


async def test_starwars_l7(scene: dict[str, Any]) -> None:
    flows: list[dict[str, Any]] = []
    proxy = HTTPProxy(scene["view"], flows.append, port=PROXY_PORT, netns=scene["node_ns"])
    await proxy.start()
    try:
        tie, xwing = scene["pods"]["tiefighter"].netns, scene["pods"]["xwing"].netns
        assert await request(tie, "POST", "/v1/request-landing") == "200 Ship landed"
        assert await request(tie, "PUT", "/v1/exhaust-port") == "403 Access denied"
        assert (await request(xwing, "POST", "/v1/request-landing")).startswith("ERR")
    finally:
        await proxy.stop()
    stats = scene["pdp"].stats()
    assert stats["redirected"] >= 2 and stats["no_proxy"] == 0
    parsed = [Flow.from_wire(w) for w in flows]
    requests = [(f.l7.http.method, f.verdict, f.source.pod_name, f.destination.pod_name)
                for f in parsed
                if f.type == FlowType.L7 and not f.is_reply and f.l7 and f.l7.http]
    assert requests == [("POST", Verdict.FORWARDED, "tiefighter", "deathstar-1"),
                        ("PUT", Verdict.DROPPED, "tiefighter", "deathstar-1")]
    # The server saw the client's own address (transparent both ways).
    assert all(f.source_ip == IPS["tiefighter"] for f in parsed if not f.is_reply)

"""toFQDNs through the real redirect and DNS proxy, with the real policy compile.

A DNS server (asyncio UDP responder) in a test pod answers for ``*.ciliate.test`` with the
addresses of two test hosts (outside every endpoint: world). The client's CiliumNetworkPolicy
allows DNS to that server with ``rules.dns`` matchPattern ``*.ciliate.test`` and egress
``toFQDNs`` matchName ``allowed.ciliate.test`` on TCP/80. The identity and policy services are
stood in for by ``Cluster.request``: it allocates fqdn-labelled CIDR identities, feeds them to
the real ``PolicyEngine`` and syncs the node's maps and the proxy's view from the results.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

if os.geteuid() != 0:
    pytest.skip("needs root (network namespaces, BPF)", allow_module_level=True)

from ciliate.flows.model import Flow
from ciliate.flows.tables import FlowType, Verdict
from ciliate.labels import CIDR_IDENTITY_BASE, LabelSet
from ciliate.resources.ciliumpolicy import CiliumNetworkPolicy
from ciliate.testing import wait_until
from services.datapath.core.plan import desired_state
from services.datapath.loader import Datapath, MapSizes
from services.datapath.maps import PIN_ROOT
from services.datapath.netlink import unpin
from services.datapath.proxy.core.fqdn import FQDNCache
from services.datapath.proxy.core.policy import PolicyView
from services.datapath.proxy.dns_proxy import DNS_PROXY_PORT, DNSProxy, Learner
from services.datapath.proxy.loader import ProxyDatapath
from services.datapath.sandbox import DevCluster
from services.policy.core.compile import IdentityWorld, PolicyEngine
from services.policy.core.kv import encode_policy
from services.policy.core.spec import from_cilium_policy

SMALL = MapSizes(ct_tcp=4096, ct_any=4096, ipcache=1024, endpoints=256, policy=8192,
                 events_pages=16)
REPO = Path(__file__).resolve().parents[3]
IPS = {"client": "10.244.9.31", "dns": "10.244.9.32", "allowed": "10.244.9.33",
       "other": "10.244.9.34"}
PODS = {"client": 1001, "dns": 1002}  # endpoints; the two hosts are not (world)
TTL = 2
pytestmark = pytest.mark.privileged

DNS_SERVER = r"""
import asyncio, sys
from services.datapath.proxy.core import dns
HOSTS = {"allowed.ciliate.test.": sys.argv[1], "other.ciliate.test.": sys.argv[2],
         "evil.example.": sys.argv[2]}
class Responder(asyncio.DatagramProtocol):
    def connection_made(self, t): self.t = t
    def datagram_received(self, data, addr):
        q = dns.decode(data)
        name = q.questions[0].name.lower()
        ip = HOSTS.get(name)
        if ip is None:
            out = dns.response(q, dns.Rcode.NXDOMAIN)
        else:
            rr = dns.Record(name, dns.RRType.A, int(sys.argv[3]), ip)
            out = dns.response(q, dns.Rcode.NOERROR, [rr])
        self.t.sendto(dns.encode(out), addr)
async def main():
    await asyncio.get_running_loop().create_datagram_endpoint(Responder, local_addr=("0.0.0.0", 53))
    print("ready", flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""

TCP_SERVER = r"""
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 80)); s.listen(16); print("ready", flush=True)
while True:
    c, _ = s.accept(); c.sendall(b"hello\n"); c.close()
"""

CLIENT = r"""
import socket, sys
from services.datapath.proxy.core import dns
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3)
s.sendto(dns.query(7, sys.argv[2]), (sys.argv[1], 53))
try:
    m = dns.decode(s.recv(4096))
    print(int(m.rcode), ",".join(m.ips))
except OSError as e:
    print("ERR", type(e).__name__)
"""

CONNECT = r"""
import socket, sys
try:
    c = socket.create_connection((sys.argv[1], 80), timeout=1.5)
    print(c.recv(16).decode().strip())
except OSError as e:
    print("ERR", type(e).__name__)
"""

POLICY = {
    "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
    "metadata": {"name": "fqdn", "namespace": "default"},
    "spec": {
        "endpointSelector": {"matchLabels": {"app": "client"}},
        "egress": [
            {"toEndpoints": [{"matchLabels": {"app": "dns"}}],
             "toPorts": [{"ports": [{"port": "53", "protocol": "UDP"}],
                          "rules": {"dns": [{"matchPattern": "*.ciliate.test"}]}}]},
            {"toFQDNs": [{"matchName": "allowed.ciliate.test"}],
             "toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}]}]},
        ],
    },
}  # fmt: skip


@dataclass
class Cluster:
    """Identity + policy services in miniature, syncing the node's maps and the view."""

    dp: Datapath
    view: PolicyView
    engine: PolicyEngine
    endpoints: list[dict[str, Any]]
    ids: dict[str, int] = field(default_factory=dict)  # canonical labels -> id
    refs: dict[int, int] = field(default_factory=dict)
    prefixes: dict[int, str] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)

    def ipcache(self) -> list[dict[str, Any]]:
        out = [{"prefix": f"{IPS[n]}/32", "identity": i} for n, i in PODS.items()]
        out += [{"prefix": p, "identity": i} for i, p in self.prefixes.items()]
        return out

    def sync(self) -> None:
        policies = {i: encode_policy(p, 1) for i, p in self.engine.compiled.items()}
        self.dp.sync(desired_state(node="n1", endpoints=self.endpoints, ipcache=self.ipcache(),
                                   policies=policies))
        for i, value in policies.items():
            self.view.set_policy(str(i), value)
        self.view._ipcache_host.clear()  # rebuilt from scratch below
        for entry in self.ipcache():
            self.view.set_ipcache(str(entry["prefix"]).replace("/", "_"), entry)

    async def request(self, subject: str, payload: dict[str, Any]) -> Any:
        self.calls.append(subject)
        if subject == "identity.allocate":
            labels = LabelSet.from_strings(payload["labels"][0])
            key = ",".join(labels.sorted_strings())
            ident = self.ids.setdefault(key, CIDR_IDENTITY_BASE + 100 + len(self.ids))
            self.refs[ident] = self.refs.get(ident, 0) + 1
            if self.refs[ident] == 1:
                self.prefixes[ident] = payload["prefixes"][0]
                self.engine.add_identity(ident, labels)
            self.sync()
            return {"ids": [ident]}
        assert subject == "identity.release"
        for ident in payload["ids"]:
            self.refs[ident] -= 1
            if self.refs[ident] == 0:
                del self.prefixes[ident]
                self.engine.remove_identity(ident)
        self.sync()
        return {"unreferenced": payload["ids"]}


async def run_in(netns: str, script: str, *args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", netns, sys.executable, "-c", script, *args,
        stdout=asyncio.subprocess.PIPE, cwd=REPO)
    out, _ = await proc.communicate()
    return out.decode().strip()


@pytest.fixture
def scene(tmp_path: Path) -> Iterator[dict[str, Any]]:
    salt = "fq" + secrets.token_hex(3)
    pin_root = PIN_ROOT / f"test-{salt}"
    cluster = DevCluster(salt=salt, state_dir=tmp_path / "state")
    dp: Datapath | None = None
    pdp: ProxyDatapath | None = None
    servers: list[subprocess.Popen[bytes]] = []
    try:
        node_ns = cluster.add_node("n1").netns
        pods = {name: cluster.add_pod("n1", "default", name, ip, [], [])
                for name, ip in IPS.items()}
        for name, script, args in (("dns", DNS_SERVER, [IPS["allowed"], IPS["other"], str(TTL)]),
                                   ("allowed", TCP_SERVER, []), ("other", TCP_SERVER, [])):
            server = subprocess.Popen(
                ["ip", "netns", "exec", pods[name].netns, sys.executable, "-c", script, *args],
                cwd=REPO, stdout=subprocess.PIPE)
            servers.append(server)
            assert server.stdout is not None and server.stdout.readline().strip() == b"ready"
        endpoints: list[dict[str, Any]] = [
            {"id": i + 1, "identity": PODS[n], "ips": [IPS[n]], "node": "n1",
             "namespace": "default", "name": n,
             "labels": [f"k8s:app={n}", "k8s:io.kubernetes.pod.namespace=default"]}
            for i, n in enumerate(PODS)]
        world = {PODS[n]: LabelSet.from_strings(ep["labels"])
                 for n, ep in zip(PODS, endpoints, strict=True)}
        engine = PolicyEngine(from_cilium_policy(CiliumNetworkPolicy.model_validate(POLICY)),
                              IdentityWorld(world))
        engine.compile_all()
        dp = Datapath("n1", sizes=SMALL, pin_root=pin_root)
        for pod in pods.values():
            dp.attach(pod.ifname, netns=node_ns)
        pdp = ProxyDatapath("n1", sizes=SMALL, pin_root=pin_root)
        pdp.setup_routing(node_ns)
        for pod in pods.values():
            pdp.attach(pod.ifname, netns=node_ns)
        view = PolicyView(node="n1")
        for ep in endpoints:
            view.set_endpoint(f"default.{ep['name']}", ep)
        state = Cluster(dp, view, engine, endpoints)
        state.sync()
        yield {"pods": pods, "state": state, "pdp": pdp, "node_ns": node_ns}
    finally:
        for server in servers:
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


async def test_to_fqdns_learn_connect_refuse_expire(scene: dict[str, Any]) -> None:
    state: Cluster = scene["state"]
    flows: list[dict[str, Any]] = []
    learner = Learner(state.request, FQDNCache(min_ttl=0))
    proxy = DNSProxy(state.view, flows.append, learner=learner, port=DNS_PROXY_PORT,
                     netns=scene["node_ns"])
    await proxy.start()
    stop = asyncio.Event()
    expiry = asyncio.create_task(learner.run_expiry(stop))
    try:
        await check_scene(scene, learner, flows)
    finally:
        stop.set()
        await expiry
        await proxy.stop()


async def check_scene(scene: dict[str, Any], learner: Learner, flows: list[dict[str, Any]]
                      ) -> None:
    client = scene["pods"]["client"].netns
    state: Cluster = scene["state"]
    # Before any answer the host is world: denied.
    assert (await run_in(client, CONNECT, IPS["allowed"])).startswith("ERR")
    # The allowed name resolves (through the proxy) and its IP is then allowed.
    assert await run_in(client, CLIENT, IPS["dns"], "allowed.ciliate.test") == (
        f"0 {IPS['allowed']}")
    assert learner.held.get(IPS["allowed"]) is not None
    assert await run_in(client, CONNECT, IPS["allowed"]) == "hello"
    # A name the DNS rule allows but no toFQDNs selects: resolves, its IP stays denied.
    assert await run_in(client, CLIENT, IPS["dns"], "other.ciliate.test") == f"0 {IPS['other']}"
    assert (await run_in(client, CONNECT, IPS["other"])).startswith("ERR")
    # A name outside the DNS pattern: REFUSED by the proxy, never asked upstream.
    assert await run_in(client, CLIENT, IPS["dns"], "evil.example") == "5"
    # After the TTL the names expire: identities released, ipcache entries gone, denied again.
    await wait_until(lambda: not learner.held and not state.prefixes, timeout=TTL + 8,
                     what="learned IPs expire")
    assert (await run_in(client, CONNECT, IPS["allowed"])).startswith("ERR")
    assert scene["pdp"].stats()["no_proxy"] == 0
    # L7 DNS flows: query, rcode, ips, verdict.
    parsed = [Flow.from_wire(w) for w in flows]
    answers = [(f.l7.dns.query, f.l7.dns.rcode, f.l7.dns.ips, f.verdict) for f in parsed
               if f.type == FlowType.L7 and f.is_reply and f.l7 and f.l7.dns]
    assert answers == [
        ("allowed.ciliate.test.", 0, [IPS["allowed"]], Verdict.FORWARDED),
        ("other.ciliate.test.", 0, [IPS["other"]], Verdict.FORWARDED),
        ("evil.example.", 5, [], Verdict.DROPPED),
    ]
    assert all(f.source_ip == IPS["client"] for f in parsed if not f.is_reply)

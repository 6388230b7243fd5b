"""CNI pods enforced like dev-mode pods: ``ciliate-cni`` against the real datapath agent.

The stack around one node: the real identity and policy services (private NATS, migrated
SQLite) and the datapath agent outside dev mode with its node in a namespace of ours
(``node_netns``). The test plays k8s-sync (Pods with ``spec.nodeName`` and labels, a
NetworkPolicy applied to their owners) and the runtime (pod namespaces, ``ciliate-cni`` run
with the spec's environment). It proves: ADD answers with the address identity allocated,
attaches the policy and L7-redirect programs and writes the endpoint entries; real traffic
follows the policy; CHECK sees the programs; a restarted agent re-adopts the pods (its own
programs replace the old ones, enforcement goes on); DEL removes filters and entries.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from ciliate.bus import Bucket, Bus
from ciliate.config import Settings
from ciliate.runner import ServiceSpec, run_service
from ciliate.stack.ports import free_port
from ciliate.testing import wait_until
from services.datapath.cni.agent import tc_program_names
from services.datapath.maps import PIN_ROOT, NodeMaps, pin_dir
from services.datapath.netlink import unpin
from services.datapath.probe import Probe, run_probes
from services.datapath.service import SPEC as DATAPATH
from services.identity.service import SPEC as IDENTITY
from services.policy.service import SPEC as POLICY

pytestmark = [
    pytest.mark.privileged,
    pytest.mark.filterwarnings("ignore:Exception ignored in. <coroutine object AsyncNetlinkSocket"
                               ".setup_endpoint:pytest.PytestUnraisableExceptionWarning"),
]
if os.geteuid() != 0:
    pytest.skip("needs root (network namespaces, BPF)", allow_module_level=True)

REPO = Path(__file__).resolve().parents[3]
TOKEN = "cni-e2e-token"
NODE = "cni-node-1"
NS = "cni-e2e"
PORT = 8080


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, check=check, capture_output=True, text=True)


@dataclass
class Stack:
    tmp: Path
    nats_url: str
    db_url: str
    node_netns: str
    pin_root: Path
    http: aiohttp.ClientSession
    bus: Bus
    stop_services: asyncio.Event = field(default_factory=asyncio.Event)
    services: list[asyncio.Task[None]] = field(default_factory=list)
    urls: dict[str, str] = field(default_factory=dict)
    agent: tuple[asyncio.Task[None], asyncio.Event] | None = None
    pod_netns: dict[str, str] = field(default_factory=dict)
    servers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    containers: dict[str, str] = field(default_factory=dict)

    async def start(self, spec: ServiceSpec, stop: asyncio.Event, **extra: str) -> str:
        port = free_port()
        settings = Settings(nats_url=self.nats_url, db_url=self.db_url, token=TOKEN, node=NODE,
                            state_dir=self.tmp / spec.name, http_port=port,
                            replica=f"{spec.name}-{secrets.token_hex(2)}", extra=extra)
        task = asyncio.create_task(run_service(spec, settings, stop))
        url = f"http://127.0.0.1:{port}"

        async def up() -> bool:
            if task.done():
                task.result()
            try:
                async with self.http.get(f"{url}/healthz") as resp:
                    return resp.status == 200
            except aiohttp.ClientError:
                return False

        await wait_until(up, 120, f"{spec.name} to serve HTTP")
        if spec is DATAPATH:
            self.agent = (task, stop)
        else:
            self.services.append(task)
        self.urls[spec.name] = url
        return url

    async def start_agent(self) -> None:
        await self.start(DATAPATH, asyncio.Event(), node_netns=self.node_netns,
                         bpf_pin_root=str(self.pin_root), bpf_map_sizes="small",
                         kube_proxy_replacement="0", cni="1", metrics_interval="0.5")

    async def stop_agent(self) -> None:
        assert self.agent is not None
        task, stop = self.agent
        self.agent = None
        stop.set()
        await asyncio.wait_for(task, 60)

    async def apply(self, service: str, doc: dict[str, Any]) -> None:
        async with self.http.post(self.urls[service] + "/v1/resources", json=doc) as resp:
            assert resp.status in (200, 201), await resp.text()

    def netconf(self) -> bytes:
        token = self.tmp / "token"
        token.write_text(TOKEN)
        return json.dumps({"cniVersion": "1.0.0", "name": "ciliate", "type": "ciliate-cni",
                           "agent": {"url": self.urls["datapath"],
                                     "tokenFile": str(token)}}).encode()

    async def cni(self, command: str, pod: str) -> tuple[int, Any]:
        """The runtime's call for ``pod`` (its namespace and container ID made on first use)."""
        if pod not in self.pod_netns:
            self.pod_netns[pod] = f"ccni-{uuid.uuid4().hex[:8]}"
            sh("ip", "netns", "add", self.pod_netns[pod])
            self.containers[pod] = uuid.uuid4().hex
        env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO), "CNI_COMMAND": command,
               "CNI_CONTAINERID": self.containers[pod],
               "CNI_NETNS": f"/var/run/netns/{self.pod_netns[pod]}", "CNI_IFNAME": "eth0",
               "CNI_PATH": "/opt/cni/bin",
               "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE={NS};K8S_POD_NAME={pod}"}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.datapath.cni.plugin", env=env, cwd=REPO,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        out, _ = await proc.communicate(self.netconf())
        return proc.returncode or 0, json.loads(out) if out.strip() else None

    def serve(self, pod: str) -> None:
        """The pod's workload: the dev pods' server on PORT, in the runtime's namespace."""
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.pod_netns[pod], sys.executable, "-m",
             "services.datapath.podserver", "--name", f"{NS}/{pod}", "--tcp", str(PORT)],
            stdout=subprocess.PIPE, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
        self.servers.append(proc)
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"

    async def reach(self, src: str, dst_ip: str) -> bool:
        return (await run_probes([Probe(self.pod_netns[src], dst_ip, PORT, "TCP")],
                                 timeout=1.5))[0]

    async def endpoint_entries(self) -> dict[str, Any]:
        return await asyncio.to_thread(self._endpoint_entries)

    def _endpoint_entries(self) -> dict[str, Any]:
        d = pin_dir(NODE, self.pin_root)
        if not (d / "cil_lxc").exists():
            return {}
        maps = NodeMaps.open(d)
        try:
            return dict(maps.endpoint_entries())
        finally:
            maps.close()

    async def kv_endpoint(self, pod: str) -> Any:
        kv = await self.bus.kv(Bucket.ENDPOINTS)
        return (await kv.items()).get(f"{NS}.{pod}")


def prog_ids(ifname: str, netns: str) -> set[int]:
    """IDs of the BPF programs in tc filters on ``ifname`` (changes when an agent re-attaches;
    pyroute2 does not decode ``TCA_BPF_ID``, tc does)."""
    out: set[int] = set()
    for hook in ("ingress", "egress"):
        shown = sh("tc", "-n", netns, "-j", "filter", "show", "dev", ifname, hook).stdout
        for f in json.loads(shown or "[]"):
            prog = f.get("options", {}).get("prog", {})
            if "id" in prog:
                out.add(int(prog["id"]))
    return out


@pytest.fixture
async def stack(nats_url: str, sqlite_url: str, tmp_path: Path) -> AsyncIterator[Stack]:
    salt = secrets.token_hex(3)
    node_ns = f"ccni-node-{salt}"
    sh("ip", "netns", "add", node_ns)
    bus = await Bus.connect(nats_url, name="test-cni-agent")
    http = aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"})
    s = Stack(tmp_path, nats_url, sqlite_url, node_ns, PIN_ROOT / f"test-cni-{salt}", http, bus)
    try:
        sh("ip", "netns", "exec", node_ns, "sysctl", "-qw", "net.ipv4.ip_forward=1",
           "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0")
        sh("ip", "-n", node_ns, "link", "set", "lo", "up")
        yield s
    finally:
        if s.agent is not None:
            with contextlib.suppress(Exception):
                await s.stop_agent()
        s.stop_services.set()
        await asyncio.gather(*s.services, return_exceptions=True)
        for proc in s.servers:
            proc.kill()
            proc.wait()
            if proc.stdout:
                proc.stdout.close()
        for pod_ns in s.pod_netns.values():
            sh("ip", "netns", "del", pod_ns, check=False)
        sh("ip", "netns", "del", node_ns, check=False)  # takes the host veths with it
        if s.pin_root.exists():
            for d in s.pin_root.iterdir():
                unpin(d)
            s.pin_root.rmdir()
        await http.close()
        await bus.close()


def pod_doc(name: str, app: str) -> dict[str, Any]:
    """A scheduled pod as k8s-sync feeds it: nodeName set, no address yet."""
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": NS, "labels": {"app": app}},
            "spec": {"nodeName": NODE, "containers": [
                {"name": "c", "image": "agnhost",
                 "ports": [{"containerPort": PORT, "protocol": "TCP"}]}]}}


DENY_INTO_A = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
               "metadata": {"name": "deny-into-a", "namespace": NS},
               "spec": {"podSelector": {"matchLabels": {"app": "a"}},
                        "policyTypes": ["Ingress"]}}


async def test_cni_pods_are_enforced_readopted_after_restart_and_released_on_del(
    stack: Stack,
) -> None:
    s = stack
    await s.start(IDENTITY, s.stop_services)
    await s.start(POLICY, s.stop_services)
    await s.start_agent()
    await s.apply("identity", {"apiVersion": "v1", "kind": "Namespace",
                               "metadata": {"name": NS}})
    await s.apply("identity", pod_doc("a", "a"))
    await s.apply("identity", pod_doc("b", "b"))
    await s.apply("policy", DENY_INTO_A)

    # ADD answers with the address identity allocated for the pod (cluster-pool IPAM).
    ips: dict[str, str] = {}
    hosts: dict[str, str] = {}
    for pod in ("a", "b"):
        rc, result = await s.cni("ADD", pod)
        assert rc == 0, result
        ips[pod] = result["ips"][0]["address"].split("/")[0]
        hosts[pod] = result["interfaces"][0]["name"]
        ep = await s.kv_endpoint(pod)
        assert ep["ips"] == [ips[pod]] and ep["node"] == NODE
        s.serve(pod)
    assert ips["a"] != ips["b"]

    # The programs are on the host veths and the endpoints in the node's map.
    for pod in ("a", "b"):
        names = await asyncio.to_thread(tc_program_names, hosts[pod], s.node_netns)
        assert {"from_container", "to_proxy"} <= names["ingress"], names
        assert "to_container" in names["egress"], names
    entries = await s.endpoint_entries()
    assert {ips["a"], ips["b"]} <= set(entries)
    ident_a = (await s.kv_endpoint("a"))["identity"]
    assert entries[ips["a"]].identity == ident_a

    # The policy holds on real traffic: b -> a denied (once policy reached the map), a -> b
    # allowed. Before the policy is in, b -> a may still pass; wait for the deny.
    async def denied() -> bool:
        return not await s.reach("b", ips["a"])

    await wait_until(denied, 60, "b -> a denied by deny-into-a")
    assert await s.reach("a", ips["b"])
    for pod in ("a", "b"):
        assert await s.cni("CHECK", pod) == (0, None)

    # Restart the agent: the CNI pods are re-adopted (the new agent's programs replace the
    # old ones) and enforcement goes on.
    before = {pod: await asyncio.to_thread(prog_ids, hosts[pod], s.node_netns)
              for pod in ("a", "b")}
    await s.stop_agent()
    assert await s.reach("a", ips["b"]), "filters and maps stay while no agent runs"
    assert not await s.reach("b", ips["a"])
    await s.start_agent()

    async def readopted() -> bool:
        now = {p: await asyncio.to_thread(prog_ids, hosts[p], s.node_netns) for p in before}
        return all(now[p] - before[p] for p in before)

    await wait_until(readopted, 60, "the restarted agent to re-attach its programs")
    for pod in ("a", "b"):
        assert await s.cni("CHECK", pod) == (0, None)
    assert await s.reach("a", ips["b"])
    assert not await s.reach("b", ips["a"])

    # DEL: entries and filters go (the pod is still in identity: the sandbox went, not the pod).
    assert await s.cni("DEL", "b") == (0, None)
    assert ips["b"] not in await s.endpoint_entries()
    assert ips["a"] in await s.endpoint_entries()
    gone = await asyncio.to_thread(tc_program_names, hosts["b"], s.node_netns)
    assert gone == {"ingress": set(), "egress": set()}
    assert not (s.tmp / "datapath" / "pods" / f"{NS}.b.json").exists()
    assert (await s.kv_endpoint("b")) is not None
    rc, err = await s.cni("CHECK", "b")
    assert rc == 1 and err["code"] == 3
    assert await s.cni("DEL", "b") == (0, None)
    assert not await s.reach("a", ips["b"])
    assert await s.cni("DEL", "a") == (0, None)
    assert await s.endpoint_entries() == {}

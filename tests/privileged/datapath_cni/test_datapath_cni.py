"""``ciliate-cni`` driven as a container runtime drives it, wiring real network namespaces.

The runtime's part is played here: it creates the pod's network namespace (``ip netns add``,
so ``CNI_NETNS`` is ``/var/run/netns/<name>``) and runs the plugin with the spec's environment
and network config on stdin. The node is a namespace of its own, so nothing touches the host.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from ciliate.api import make_app
from ciliate.stack.ports import free_port
from services.datapath.cni.agent import CniAgent

pytestmark = pytest.mark.privileged
REPO = Path(__file__).resolve().parents[3]
TOKEN = "cni-agent-token"
POD_CIDR = "10.250.7.0/24"


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, check=check, capture_output=True, text=True)


@dataclass
class Node:
    netns: str
    agent_url: str
    token_file: Path
    pods: list[str]

    def netconf(self, version: str = "1.0.0") -> bytes:
        return json.dumps({"cniVersion": version, "name": "ciliate", "type": "ciliate-cni",
                           "agent": {"url": self.agent_url,
                                     "tokenFile": str(self.token_file)}}).encode()

    def new_pod_netns(self) -> str:
        name = f"ck8s-pod-{uuid.uuid4().hex[:8]}"
        sh("ip", "netns", "add", name)
        self.pods.append(name)
        return name


async def cni(node: Node, command: str, netns: str, container: str, pod: str = "",
              stdin: bytes | None = None) -> tuple[int, Any]:
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO), "CNI_COMMAND": command,
           "CNI_CONTAINERID": container, "CNI_NETNS": f"/var/run/netns/{netns}",
           "CNI_IFNAME": "eth0", "CNI_PATH": "/opt/cni/bin"}
    if pod:
        env["CNI_ARGS"] = f"IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={pod}"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.datapath.cni.plugin", env=env, cwd=REPO,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate(node.netconf() if stdin is None else stdin)
    return proc.returncode or 0, json.loads(out) if out.strip() else None


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    name = f"ck8s-node-{uuid.uuid4().hex[:8]}"
    sh("ip", "netns", "add", name)
    n = Node(name, "", tmp_path / "token", [])
    runner: web.AppRunner | None = None
    try:
        sh("ip", "netns", "exec", name, "sysctl", "-qw", "net.ipv4.ip_forward=1",
           "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0")
        sh("ip", "-n", name, "link", "set", "lo", "up")
        n.token_file.write_text(TOKEN)
        agent = CniAgent(POD_CIDR, tmp_path / "agent", node_netns=name)
        app = make_app("cni-agent", token=TOKEN)
        agent.register(app)
        runner = web.AppRunner(app, handle_signals=False)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        n.agent_url = f"http://127.0.0.1:{port}"
        yield n
    finally:
        if runner is not None:
            await runner.cleanup()
        for pod in n.pods:
            sh("ip", "netns", "del", pod, check=False)
        sh("ip", "netns", "del", name, check=False)


def links(netns: str) -> dict[str, Any]:
    return {link["ifname"]: link for link in json.loads(sh("ip", "-n", netns, "-j", "addr").stdout)}


def tcp_roundtrip(src_ns: str, dst_ns: str, dst_ip: str) -> str:
    """A TCP connection from one pod to a listener in the other; returns what came back."""
    server = subprocess.Popen(
        ["ip", "netns", "exec", dst_ns, sys.executable, "-c",
         "import socket,sys\ns=socket.create_server(('0.0.0.0', 8080))\nprint('ready', flush=True)"
         "\nc,_=s.accept()\nc.sendall(b'pong:'+c.recv(64))\nc.close()"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        assert server.stdout.readline().strip() == "ready"
        client = sh("ip", "netns", "exec", src_ns, sys.executable, "-c",
                    f"import socket\nc=socket.create_connection(('{dst_ip}', 8080), timeout=5)"
                    "\nc.sendall(b'ping')\nprint(c.recv(64).decode())")
        return client.stdout.strip()
    finally:
        server.kill()
        server.wait()
        if server.stdout:
            server.stdout.close()


async def test_add_wires_two_pods_that_reach_each_other_and_del_removes_them(node: Node) -> None:
    ns1, ns2 = node.new_pod_netns(), node.new_pod_netns()
    rc, result1 = await cni(node, "ADD", ns1, "c0ffee01", pod="web")
    assert rc == 0, result1
    rc, result2 = await cni(node, "ADD", ns2, "c0ffee02", pod="client")
    assert rc == 0, result2

    assert result1["cniVersion"] == "1.0.0"
    ip1 = result1["ips"][0]["address"].split("/")[0]
    ip2 = result2["ips"][0]["address"].split("/")[0]
    assert ip1 != ip2
    assert result1["ips"][0]["interface"] == 1
    assert result1["interfaces"][1] == {"name": "eth0", "mac": result1["interfaces"][1]["mac"],
                                        "sandbox": f"/var/run/netns/{ns1}"}
    pod_eth0 = links(ns1)["eth0"]
    assert {a["local"] for a in pod_eth0["addr_info"] if a["family"] == "inet"} == {ip1}
    routes = json.loads(sh("ip", "-n", ns1, "-j", "route").stdout)
    assert any(r["dst"] == "default" and r.get("gateway") == "169.254.1.1" for r in routes)
    host_if = result1["interfaces"][0]["name"]
    assert host_if in links(node.netns)
    node_routes = json.loads(sh("ip", "-n", node.netns, "-j", "route").stdout)
    assert any(r["dst"] == ip1 and r.get("dev") == host_if for r in node_routes)

    assert tcp_roundtrip(ns2, ns1, ip1) == "pong:ping"
    assert tcp_roundtrip(ns1, ns2, ip2) == "pong:ping"

    # The runtime retries ADD: the same container gets the same answer.
    rc, again = await cni(node, "ADD", ns1, "c0ffee01", pod="web")
    assert rc == 0 and again["ips"] == result1["ips"]
    rc, checked = await cni(node, "CHECK", ns1, "c0ffee01", pod="web")
    assert (rc, checked) == (0, None)

    rc, deleted = await cni(node, "DEL", ns1, "c0ffee01", pod="web")
    assert (rc, deleted) == (0, None)
    assert host_if not in links(node.netns)
    assert "eth0" not in links(ns1)
    rc, _ = await cni(node, "DEL", ns1, "c0ffee01", pod="web")
    assert rc == 0, "DEL of an already deleted container succeeds"
    rc, err = await cni(node, "CHECK", ns1, "c0ffee01", pod="web")
    assert rc == 1 and err["code"] == 3
    rc, result3 = await cni(node, "ADD", ns1, "c0ffee03", pod="web2")
    assert rc == 0 and result3["ips"][0]["address"] != result2["ips"][0]["address"]
    with contextlib.suppress(Exception):
        await cni(node, "DEL", ns2, "c0ffee02")
        await cni(node, "DEL", ns1, "c0ffee03")


async def test_spec_errors_come_back_as_error_json_with_codes(node: Node) -> None:
    ns = node.new_pod_netns()
    rc, err = await cni(node, "ADD", ns, "c0ffee10")  # no K8S_POD_* in CNI_ARGS
    assert rc == 1 and err["code"] == 4 and "K8S_POD_NAME" in err["msg"]
    rc, err = await cni(node, "ADD", ns, "c0ffee10", pod="p", stdin=b"{not json")
    assert rc == 1 and err["code"] == 6
    rc, err = await cni(node, "ADD", ns, "c0ffee10", pod="p",
                        stdin=json.dumps({"cniVersion": "9.9.9"}).encode())
    assert rc == 1 and err["code"] == 1
    rc, version = await cni(node, "VERSION", ns, "", stdin=b'{"cniVersion": "1.0.0"}')
    assert rc == 0 and "1.0.0" in version["supportedVersions"]
    rc, err = await cni(node, "ADD", "missing-netns-xyz", "c0ffee11", pod="p")
    assert rc == 1 and err["code"] == 3
    node.token_file.write_text("wrong")
    rc, err = await cni(node, "ADD", ns, "c0ffee12", pod="p")
    assert rc == 1 and err["code"] == 5 and "401" in err["msg"]

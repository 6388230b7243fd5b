"""Shared by the LB privileged tests (conftest and tests): a salted two-node dev cluster with
LB programs on both nodes: socket LB at each node's cgroup subtree, tc LB on each eth0.
Backends b1, b2 on n1 and b3 on n2 answer TCP 8080 and UDP 8081 with their names; c1 is a
client pod on n1."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.datapath.lb.loader import LbDatapath, LbSizes
from services.datapath.sandbox import CGROUP_ROOT, DevCluster, PodSandbox, enter_cgroup

PEER = Path(__file__).with_name("lb_peer.py")
REPO_ROOT = Path(__file__).resolve().parents[3]
if str(REPO_ROOT) not in sys.path:  # bench.kube_proxy.kv builds the KV dicts (not installed)
    sys.path.insert(0, str(REPO_ROOT))
SIZES = LbSizes(services=4096, backends=4096, revnat=4096, sk_revnat=4096, affinity=1024,
                ct=4096, maglev_tables=64, events_pages=8)
MAGLEV_M = 251
BACKENDS = {"b1": ("n1", "10.244.1.11"), "b2": ("n1", "10.244.1.12"),
            "b3": ("n2", "10.244.2.13")}
TCP_PORT, UDP_PORT = 8080, 8081


@dataclass
class LbCluster:
    cluster: DevCluster
    salt: str
    lbs: dict[str, LbDatapath]
    pods: dict[str, PodSandbox]
    host_cgroups: dict[str, Path] = field(default_factory=dict)

    def node_ip(self, node: str) -> str:
        return self.cluster.nodes[node].ip

    def node_cgroup(self, node: str) -> Path:
        return CGROUP_ROOT / (self.salt + node)

    def sync(self, kv: dict[str, dict[str, Any]]) -> None:
        for lb in self.lbs.values():
            lb.sync(kv)

    def where(self, pod: str | None, node: str | None,
              socket_lb: bool = True) -> tuple[str, Path | None]:
        """(netns, cgroup) of a pod, or of a node process: under the node's cgroup subtree
        (socket LB applies) or, with ``socket_lb=False``, left in the test's own cgroup
        (an outside client: only the tc path sees its traffic)."""
        if pod is not None:
            rec = self.pods[pod].record
            return rec.netns, Path(rec.cgroup)
        assert node is not None
        return self.cluster.nodes[node].netns, self.host_cgroups[node] if socket_lb else None

    def run_client(self, kind: str, ip: str, port: int, n: int, *, pod: str | None = None,
                   node: str | None = None, socket_lb: bool = True) -> dict[str, Any]:
        """``n`` connections (or datagrams); returns the peers' answers and errors."""
        return self.run_peer(kind, ip, str(port), str(n), pod=pod, node=node,
                             socket_lb=socket_lb)

    def run_peer(self, *args: str, pod: str | None = None, node: str | None = None,
                 socket_lb: bool = True) -> dict[str, Any]:
        """Run a peer command (lb_peer.py) where ``where`` says; its JSON output."""
        ns, cg = self.where(pod, node, socket_lb)
        out = subprocess.run(
            ["ip", "netns", "exec", ns, sys.executable, str(PEER), *args],
            preexec_fn=(lambda: enter_cgroup(str(cg))) if cg else None, capture_output=True,
            check=True, timeout=120)
        result: dict[str, Any] = json.loads(out.stdout)
        return result

    def hold(self, ip: str, port: int, n: int, *, pod: str | None = None,
             node: str | None = None, socket_lb: bool = True) -> subprocess.Popen[str]:
        ns, cg = self.where(pod, node, socket_lb)
        return subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, str(PEER), "hold", ip, str(port),
             str(n)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            preexec_fn=(lambda: enter_cgroup(str(cg))) if cg else None)


def _serve(pod: PodSandbox, name: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        ["ip", "netns", "exec", pod.netns, sys.executable, str(PEER), "serve", name,
         str(TCP_PORT), str(UDP_PORT)],
        stdout=subprocess.PIPE, preexec_fn=lambda: enter_cgroup(pod.record.cgroup))
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != b"ready":
        proc.kill()
        raise RuntimeError(f"peer {name} did not start")
    return proc



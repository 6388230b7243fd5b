"""NodePort in DSR mode (bpf-lb-mode=dsr) against the default SNAT mode: a client pod on n3
connects to n1's NodePort, the only backend is b3 on n2. In both modes the client sees the
NodePort address as its peer; with DSR the replies go from n2 straight to n3 (none arrive at
n1, checked by a packet socket on n1's eth0) and n2 holds the reverse translation, with SNAT
every reply comes back through n1."""

from __future__ import annotations

import ipaddress
import json
import socket
import subprocess
import sys
from typing import Any

import pytest
from datapath_lb_env import BACKENDS, MAGLEV_M, PEER, LbCluster  # type: ignore[import-not-found,unused-ignore]
from test_datapath_lb_traffic import NODEPORT, NODEPORT_UDP, web  # type: ignore[import-not-found,unused-ignore]

from bench.kube_proxy.kv import render  # after the env: sys.path

CT_REV = 1
CT_DSR = 0x02


def sniffer(lbc: LbCluster, node: str, client_ip: str) -> subprocess.Popen[str]:
    ns = lbc.cluster.nodes[node].netns
    p = subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, str(PEER), "sniff", "eth0", client_ip,
         BACKENDS["b3"][1]], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    if p.stdout.readline().strip() != "ready":
        p.kill()
        raise RuntimeError("sniffer did not start")
    return p


def stop(p: subprocess.Popen[str]) -> dict[str, int]:
    assert p.stdin is not None and p.stdout is not None
    try:
        p.stdin.write("stop\n")
        p.stdin.flush()
        counts: dict[str, int] = json.loads(p.stdout.readline())
        return counts
    finally:
        p.kill()
        p.wait()
        p.stdin.close()
        p.stdout.close()


def rev_entries(lbc: LbCluster, node: str) -> list[Any]:
    return [(k, v) for k, v in lbc.lbs[node].maps.ct.items() if k.dir == CT_REV]


@pytest.mark.privileged
@pytest.mark.parametrize("lb3", ["dsr", "snat"], indirect=True)
def test_nodeport_to_remote_backend_replies_bypass_the_entry_node_in_dsr(
        lb3: LbCluster) -> None:
    mode = lb3.lbs["n1"].mode
    lb3.sync(render([web(["b3"])], m=MAGLEV_M))
    n1 = lb3.node_ip("n1")
    client_ip = lb3.pods["c3"].ip
    sn = sniffer(lb3, "n1", client_ip)
    try:
        tcp = lb3.run_client("tcp", n1, NODEPORT, 20, pod="c3")
        udp = lb3.run_client("udp", n1, NODEPORT_UDP, 20, pod="c3")
    finally:
        counts = stop(sn)
    assert tcp["errors"] == {} and tcp["answers"] == {"b3": 20}, tcp
    assert tcp["peers"] == [f"{n1}:{NODEPORT}"], "the client sees the NodePort address"
    assert udp["errors"] == {} and udp["answers"] == {"b3": 20}, udp
    assert udp["peers"] == [f"{n1}:{NODEPORT_UDP}"]
    assert counts["from_client"] >= 40, counts  # the sniffer sees n1's traffic
    n2_rev = [v for _k, v in rev_entries(lb3, "n2") if v.flags & CT_DSR]
    if mode == "dsr":
        assert counts["replies"] == 0, f"replies crossed n1 in DSR mode: {counts}"
        assert n2_rev, "n2 keeps the reverse translation from the DSR option"
        assert {(ipaddress.IPv4Address(bytes(v.orig_addr)),
                 socket.ntohs(v.orig_port)) for v in n2_rev} == {
            (ipaddress.IPv4Address(n1), NODEPORT), (ipaddress.IPv4Address(n1), NODEPORT_UDP)}
        assert not rev_entries(lb3, "n1"), "no reverse entry on the entry node"
    else:
        assert counts["replies"] >= 40, counts
        assert not n2_rev and rev_entries(lb3, "n1")

"""Drop events with Cilium's reasons and both identities; state and connections surviving an
agent restart. Policies are hand-written KV payloads (the contract), not compiled."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from services.datapath.core.plan import desired_state
from services.datapath.loader import Datapath, MapSizes, MonitorConfig, PolicyVerdictLog
from services.datapath.probe import Probe, in_netns, run_probes
from services.datapath.sandbox import DevCluster

pytestmark = pytest.mark.privileged

CLIENT, SERVER, OTHER = 300, 301, 302
PODS = {"c": ("10.244.9.1", CLIENT), "s": ("10.244.9.2", SERVER), "d": ("10.244.9.3", OTHER)}


def _state(node: str) -> Any:
    endpoints = [{"id": i, "namespace": "t", "name": name, "identity": ident, "ips": [ip],
                  "node": node} for i, (name, (ip, ident)) in enumerate(PODS.items(), start=1)]
    ipcache = [{"prefix": f"{ip}/32", "identity": ident, "node": node}
               for ip, ident in PODS.values()]
    policy = {
        "identity": SERVER, "revision": 1, "enforce": {"ingress": True, "egress": False},
        "entries": [
            {"peer": CLIENT, "direction": "ingress", "proto": 6, "port": 80,
             "port_prefixlen": 16, "deny": False, "proxy_port": 0, "cookies": []},
            {"peer": OTHER, "direction": "ingress", "proto": 0, "port": 0,
             "port_prefixlen": 0, "deny": True, "proxy_port": 0, "cookies": []},
            {"peer": 0, "direction": "ingress", "proto": 6, "port": 80,
             "port_prefixlen": 16, "deny": False, "proxy_port": 0, "cookies": []},
        ],
    }
    return desired_state(node=node, endpoints=endpoints, ipcache=ipcache,
                         policies={SERVER: policy})


@pytest.fixture
def one_node(cluster: DevCluster, datapaths: dict[str, Datapath]) -> Iterator[DevCluster]:
    dp = datapaths["n1"]
    for name, (ip, _) in PODS.items():
        pod = cluster.add_pod("n1", "t", name, ip, [80, 81], [80])
        dp.attach(pod.ifname, cluster.nodes["n1"].netns)
    dp.sync(_state("n1"))
    yield cluster


def _probe(cluster: DevCluster, src: str, dst: str, port: int, proto: str = "TCP") -> bool:
    pods = cluster.pods()
    p = Probe(pods[f"t/{src}"].netns, PODS[dst][0], port, proto)
    return asyncio.run(run_probes([p], timeout=1.0))[0]


def _wait_flows(dp: Datapath, want: Any, timeout: float = 5.0) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen += dp.poll_events(100)
        if want(seen):
            return seen
    raise AssertionError(f"flows never matched; saw {seen}")


def test_denied_connections_emit_drop_events_with_reason_and_identities(
    one_node: DevCluster, datapaths: dict[str, Datapath]
) -> None:
    dp = datapaths["n1"]
    dp.poll_events(0)
    assert _probe(one_node, "c", "s", 80)
    assert not _probe(one_node, "c", "s", 81)  # nothing allows 81: default deny
    assert not _probe(one_node, "d", "s", 80)  # the deny rule beats the allow of port 80

    def dropped(flows: list[dict[str, Any]], reason: str, src: int) -> list[dict[str, Any]]:
        return [f for f in flows if f["verdict"] == "DROPPED" and f["drop_reason_desc"] == reason
                and f["src_identity"] == src and f["dst_identity"] == SERVER]

    flows = _wait_flows(dp, lambda fl: dropped(fl, "POLICY_DENIED", CLIENT)
                        and dropped(fl, "POLICY_DENY", OTHER))
    default_deny = dropped(flows, "POLICY_DENIED", CLIENT)[0]
    assert default_deny["drop_reason"] == 133
    assert (default_deny["dst_port"], default_deny["proto"]) == (81, "TCP")
    assert default_deny["traffic_direction"] == "INGRESS"
    assert "SYN" in default_deny["tcp_flags"]
    assert dropped(flows, "POLICY_DENY", OTHER)[0]["drop_reason"] == 181
    # Default policy-verdict log (denied): the allowed connection is not a verdict event; its
    # first packet is traced where it enters the server pod instead.
    assert not [f for f in flows if f["type"] == "POLICY_VERDICT" and f["verdict"] == "FORWARDED"]
    first = [f for f in flows if f["type"] == "TRACE" and f["dst_port"] == 80
             and f["src_identity"] == CLIENT and f["tcp_flags"] == ["SYN"]]
    assert first and first[0]["traffic_direction"] == "INGRESS"
    # Per-entry counters count what matched.
    counters = {(k.peer, v.deny): packets for k, v, packets, _ in dp.maps.policy_entries()}
    assert counters[(OTHER, True)] >= 1 and counters[(CLIENT, False)] >= 1


def test_restart_keeps_maps_and_established_connection(
    one_node: DevCluster, datapaths: dict[str, Datapath], pin_root: Path, map_sizes: MapSizes
) -> None:
    pods = one_node.pods()
    with in_netns(pods["t/c"].netns):
        conn = socket.create_connection((PODS["s"][0], 80), timeout=2)
    try:
        assert conn.recv(64) == b"t/s\n"
        before = {e.saddr for _, e in datapaths["n1"].maps.ct_entries()}
        datapaths["n1"].close()  # the agent goes away; filters and pinned maps stay

        conn.sendall(b"while-down")
        assert conn.recv(64) == b"while-down"
        assert not _probe(one_node, "d", "s", 80)

        dp = Datapath("n1", sizes=map_sizes, pin_root=pin_root)
        datapaths["n1"] = dp
        assert {e.saddr for _, e in dp.maps.ct_entries()} >= before
        assert dp.sync(_state("n1")) == 0  # the maps already hold everything
        for pod in pods.values():
            dp.attach(pod.ifname, one_node.nodes["n1"].netns)

        conn.sendall(b"after-restart")
        assert conn.recv(64) == b"after-restart"
        assert not _probe(one_node, "d", "s", 80)
        assert _probe(one_node, "c", "s", 80)
    finally:
        conn.close()


def test_policy_verdict_log_all_reports_allowed_connections(
    one_node: DevCluster, datapaths: dict[str, Datapath], map_sizes: MapSizes, pin_root: Path
) -> None:
    """CILIATE_POLICY_VERDICT_LOG=all: a verdict event (with its match type) per allowed
    connection, as before the filter."""
    dp = Datapath("n1", sizes=map_sizes, pin_root=pin_root,
                  monitor=MonitorConfig(policy_verdicts=PolicyVerdictLog.ALL))
    try:
        for name in PODS:
            dp.attach(one_node.pods()[f"t/{name}"].ifname, one_node.nodes["n1"].netns)
        dp.poll_events(0)
        assert _probe(one_node, "c", "s", 80)
        flows = _wait_flows(dp, lambda fl: [f for f in fl if f["type"] == "POLICY_VERDICT"])
        allowed = [f for f in flows if f["verdict"] == "FORWARDED" and f["dst_port"] == 80
                   and f["src_identity"] == CLIENT and f["type"] == "POLICY_VERDICT"]
        assert allowed and allowed[0]["policy_match_type"] == "L3_L4"
    finally:
        dp.close()


def test_default_aggregation_makes_no_per_packet_traces(
    one_node: DevCluster, datapaths: dict[str, Datapath]
) -> None:
    """Medium aggregation: an established connection's data packets add no trace events (only
    new TCP flags do), and nothing is traced on the pods' egress side (FROM_LXC)."""
    dp = datapaths["n1"]
    with in_netns(one_node.pods()["t/c"].netns):
        conn = socket.create_connection((PODS["s"][0], 80), timeout=3)
    try:
        assert conn.recv(64)
        sport = conn.getsockname()[1]
        for i in range(50):
            conn.sendall(f"m{i:03d}".encode())
            assert conn.recv(64) == f"m{i:03d}".encode()
    finally:
        conn.close()
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:  # collect what the connection produced
        seen += dp.poll_events(100)
    mine = [f for f in seen if sport in (f["src_port"], f["dst_port"])]
    traces = [f for f in mine if f["type"] == "TRACE"]
    assert traces, mine  # the SYN, the SYN-ACK, ...
    assert len(traces) <= 8, [(f["traffic_direction"], f["tcp_flags"]) for f in traces]
    assert all(f["traffic_direction"] == "INGRESS" for f in traces)

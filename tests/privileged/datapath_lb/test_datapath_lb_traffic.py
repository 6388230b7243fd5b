"""Service load balancing over real sockets in dev-cluster namespaces: socket LB for pods and
node processes, tc LB for NodePort traffic from another node, backend removal, affinity and
services without backends."""

from __future__ import annotations

import json
import time
from typing import Any

from datapath_lb_env import BACKENDS, MAGLEV_M, TCP_PORT, UDP_PORT, LbCluster  # type: ignore[import-not-found,unused-ignore]

from bench.kube_proxy.kv import Backend, Frontend, Service, render  # after the env: sys.path

VIP = "10.96.0.10"
NODEPORT = 31080
NODEPORT_UDP = 31053


def web(backends: list[str] | None = None, *, affinity: int = 0, algorithm: str = "maglev",
        states: dict[str, str] | None = None) -> Service:
    names = list(BACKENDS) if backends is None else backends
    states = states or {}
    bes = []
    for i, name in enumerate(names):
        node, ip = BACKENDS[name]
        idx = list(BACKENDS).index(name)
        st = states.get(name, "active")
        bes.append(Backend(10 + idx, ip, TCP_PORT, node, state=st, port_name="http"))
        bes.append(Backend(20 + idx, ip, UDP_PORT, node, "UDP", state=st, port_name="dns"))
        del i
    return Service("default", "web", [
        Frontend(1, VIP, 80, port_name="http"),
        Frontend(2, VIP, 53, protocol="UDP", port_name="dns"),
        Frontend(3, "0.0.0.0", NODEPORT, "NodePort", port_name="http"),
        Frontend(4, "0.0.0.0", NODEPORT_UDP, "NodePort", "UDP", port_name="dns"),
    ], bes, algorithm=algorithm, affinity_timeout=affinity, type="NodePort")


def kv(*services: Service) -> dict[str, dict[str, Any]]:
    return render(list(services), m=MAGLEV_M)


def test_clusterip_tcp_udp_from_pod_and_node_reach_all_backends(lbc: LbCluster) -> None:
    lbc.sync(kv(web()))
    for where in ({"pod": "c1"}, {"node": "n1"}, {"node": "n2"}):
        tcp = lbc.run_client("tcp", VIP, 80, 45, **where)
        assert tcp["errors"] == {}, where
        assert set(tcp["answers"]) == set(BACKENDS), where
        assert tcp["peers"] == [f"{VIP}:80"], "getpeername shows the frontend"
        udp = lbc.run_client("udp", VIP, 53, 45, **where)
        assert udp["errors"] == {}, where
        assert set(udp["answers"]) == set(BACKENDS), where
        assert udp["peers"] == [f"{VIP}:53"], "UDP replies come from the frontend"


def test_300_connections_are_uniform_over_3_backends(lbc: LbCluster) -> None:
    for algorithm in ("maglev", "random"):
        lbc.sync(kv(web(algorithm=algorithm)))
        res = lbc.run_client("tcp", VIP, 80, 300, pod="c1")
        assert res["errors"] == {}
        counts = [res["answers"].get(b, 0) for b in BACKENDS]
        chi2 = sum((c - 100) ** 2 / 100 for c in counts)
        assert chi2 < 13.82, (algorithm, counts)  # df=2, p=0.001


def test_removing_a_backend_keeps_connections_to_the_others(lbc: LbCluster) -> None:
    lbc.sync(kv(web()))
    clients = [lbc.hold(VIP, 80, 30, pod="c1"),
               lbc.hold(lbc.node_ip("n1"), NODEPORT, 30, node="n2", socket_lb=False)]
    try:
        opened = []
        for p in clients:
            assert p.stdout is not None
            opened.append(json.loads(p.stdout.readline()))
        assert all(set(o) == set(BACKENDS) for o in opened), opened
        lbc.sync(kv(web(["b1", "b3"])))  # b2 scaled away
        after = lbc.run_client("tcp", VIP, 80, 30, pod="c1")
        assert set(after["answers"]) == {"b1", "b3"} and after["errors"] == {}
        np_after = lbc.run_client("tcp", lbc.node_ip("n1"), NODEPORT, 30, node="n2",
                                  socket_lb=False)
        assert set(np_after["answers"]) <= {"b1", "b3"} and np_after["errors"] == {}
        for p, o in zip(clients, opened, strict=True):
            assert p.stdin is not None and p.stdout is not None
            p.stdin.write("go\n")
            p.stdin.flush()
            alive = json.loads(p.stdout.readline())
            survivors = [a for a, name in zip(alive, o, strict=True) if name != "b2"]
            assert survivors and all(survivors), (o, alive)
    finally:
        for p in clients:
            p.kill()
            p.wait()
            for f in (p.stdin, p.stdout):
                if f:
                    f.close()


def test_terminating_backend_gets_no_new_connections(lbc: LbCluster) -> None:
    lbc.sync(kv(web(states={"b1": "terminating"})))
    res = lbc.run_client("tcp", VIP, 80, 60, pod="c1")
    assert set(res["answers"]) == {"b2", "b3"}


def test_client_ip_affinity_pins_a_client(lbc: LbCluster) -> None:
    lbc.sync(kv(web(affinity=60)))
    res = lbc.run_client("tcp", VIP, 80, 30, pod="c1")
    assert len(res["answers"]) == 1 and res["errors"] == {}
    np_res = lbc.run_client("tcp", lbc.node_ip("n1"), NODEPORT, 30, node="n2", socket_lb=False)
    assert len(np_res["answers"]) == 1 and np_res["errors"] == {}


def test_nodeport_from_another_node_uses_tc_lb(lbc: LbCluster) -> None:
    lbc.sync(kv(web()))
    n1 = lbc.node_ip("n1")
    tcp = lbc.run_client("tcp", n1, NODEPORT, 45, node="n2", socket_lb=False)
    assert tcp["errors"] == {}
    assert set(tcp["answers"]) == set(BACKENDS), "b3 on n2 is reached through SNAT"
    assert tcp["peers"] == [f"{n1}:{NODEPORT}"]
    udp = lbc.run_client("udp", n1, NODEPORT_UDP, 45, node="n2", socket_lb=False)
    assert udp["errors"] == {} and set(udp["answers"]) == set(BACKENDS)
    assert lbc.lbs["n1"].ct_entries() > 0
    # Socket LB on n2 translates the same NodePort at connect time (remote node address).
    sock = lbc.run_client("tcp", n1, NODEPORT, 30, pod="c1")
    assert sock["errors"] == {} and len(sock["answers"]) >= 2


def test_a_direct_connection_reusing_a_nodeport_flows_tuple_gets_its_own_replies(
    lbc: LbCluster,
) -> None:
    """The client port of a NodePort flow to a local backend, reused for a connection straight
    to that backend: its replies must not be reverse-NATed to the NodePort."""
    lbc.sync(kv(web(["b1", "b2"])))
    local = json.dumps({n: [BACKENDS[n][1], TCP_PORT] for n in ("b1", "b2")})
    for sport in (41001, 41002, 41003):
        got = lbc.run_peer("reuse", str(sport), lbc.node_ip("n1"), str(NODEPORT), local,
                           node="n2", socket_lb=False)
        assert got["service"] in ("b1", "b2"), got
        assert got["direct"] == got["service"], got


def test_service_without_backends_refuses_and_drops_with_158(lbc: LbCluster) -> None:
    lbc.sync(kv(web([])))
    res = lbc.run_client("tcp", VIP, 80, 3, pod="c1")
    assert res["errors"] == {"ECONNREFUSED": 3}
    udp = lbc.run_client("udp", VIP, 53, 2, pod="c1")
    assert udp["errors"] == {"ECONNREFUSED": 2}
    np_res = lbc.run_client("tcp", lbc.node_ip("n1"), NODEPORT, 1, node="n2", socket_lb=False)
    assert np_res["answers"] == {} and sum(np_res["errors"].values()) == 1
    deadline = time.monotonic() + 5
    flows: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        flows += lbc.lbs["n1"].poll_events(100)
        kinds = {(f["type"], f["drop_reason_desc"]) for f in flows}
        if {("DROP", "SERVICE_BACKEND_NOT_FOUND"),
                ("TRACE_SOCK", "SERVICE_BACKEND_NOT_FOUND")} <= kinds:
            break
    drops = [f for f in flows if f["type"] == "DROP"]
    assert drops and drops[0]["drop_reason"] == 158
    assert drops[0]["dst_port"] == NODEPORT and drops[0]["src_ip"] == lbc.node_ip("n2")
    socks = [f for f in flows if f["type"] == "TRACE_SOCK"]
    assert socks and socks[0]["dst_ip"] == VIP and socks[0]["verdict"] == "DROPPED"
    # Backends coming back make the same frontend work again.
    lbc.sync(kv(web()))
    assert lbc.run_client("tcp", VIP, 80, 5, pod="c1")["errors"] == {}


def test_bpf_lb_list_and_maglev_list_show_the_loaded_maps(lbc: LbCluster) -> None:
    from click.testing import CliRunner

    from services.datapath.lb.cli import bpf

    lbc.sync(kv(web()))
    root = str(lbc.lbs["n1"].pins.parent)
    res = CliRunner().invoke(bpf, ["lb", "list", "--pin-root", root, "--node", "n1",
                                   "-o", "json"])
    assert res.exit_code == 0, res.output
    rows = {r["service"]: r for r in json.loads(res.output)["n1"]}
    assert rows[f"{VIP}:80/TCP"]["count"] == 3
    assert {b["address"] for b in rows[f"{VIP}:80/TCP"]["backends"]} == {
        f"{ip}:{TCP_PORT}/TCP" for _n, ip in BACKENDS.values()}
    assert "NodePort" in rows[f"0.0.0.0:{NODEPORT}/TCP"]["flags"]
    text = CliRunner().invoke(bpf, ["lb", "list", "--pin-root", root, "--node", "n1"]).output
    assert text.startswith("SERVICE ADDRESS") and f"{VIP}:80/TCP (1)" in text
    mg = CliRunner().invoke(bpf, ["lb", "maglev", "list", "--pin-root", root, "--node", "n1",
                                  "--maglev-m", str(MAGLEV_M), "-o", "json"])
    assert mg.exit_code == 0, mg.output
    table = json.loads(mg.output)["n1"]["1"]
    assert len(table) == MAGLEV_M and set(table) == {10, 11, 12}

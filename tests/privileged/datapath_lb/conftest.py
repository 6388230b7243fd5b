"""Fixtures ``lbc`` (the LB test cluster of datapath_lb_env) and ``lb3`` (three nodes, LB in
the mode given by indirect parametrization), removed even on failure."""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

if os.geteuid() != 0:
    pytest.skip("needs root (network namespaces, BPF)", allow_module_level=True)

from datapath_lb_env import BACKENDS, MAGLEV_M, SIZES, LbCluster, _serve  # type: ignore[import-not-found,unused-ignore]

from services.datapath.lb.loader import LbDatapath, unpin
from services.datapath.maps import PIN_ROOT
from services.datapath.sandbox import DevCluster


@pytest.fixture
def lbc(tmp_path: Path) -> Iterator[LbCluster]:
    salt = "l" + secrets.token_hex(3)
    pin_root = PIN_ROOT / f"test-{salt}"
    cluster = DevCluster(salt=salt, state_dir=tmp_path / "state")
    lbs: dict[str, LbDatapath] = {}
    procs: list[subprocess.Popen[bytes]] = []
    c = LbCluster(cluster, salt, lbs, {})
    try:
        for n in ("n1", "n2"):
            cluster.add_node(n)
        for name, (node, ip) in BACKENDS.items():
            pod = cluster.add_pod(node, "default", name, ip, [], [])
            c.pods[name] = pod
            procs.append(_serve(pod, name))
        c.pods["c1"] = cluster.add_pod("n1", "default", "c1", "10.244.1.20", [], [])
        for n in ("n1", "n2"):
            host = c.node_cgroup(n) / "host"
            host.mkdir(parents=True, exist_ok=True)
            c.host_cgroups[n] = host
            other = [cluster.nodes[o].ip for o in cluster.nodes if o != n]
            lb = LbDatapath(n, pin_root, node_ip=cluster.nodes[n].ip, maglev_m=MAGLEV_M,
                            sizes=SIZES)
            lbs[n] = lb
            lb.set_node_addresses([cluster.nodes[n].ip], other)
            lb.attach_socket_lb(c.node_cgroup(n))
            lb.attach_nodeport("eth0", cluster.nodes[n].netns)
        yield c
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            p.wait()
            if p.stdout:
                p.stdout.close()
        for lb in lbs.values():
            with contextlib.suppress(Exception):
                lb.destroy()
        for cg in c.host_cgroups.values():
            with contextlib.suppress(OSError):
                cg.rmdir()
        cluster.destroy()
        if pin_root.exists():
            for d in pin_root.iterdir():
                unpin(d)
            pin_root.rmdir()


@pytest.fixture
def lb3(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LbCluster]:
    """n1 (entry node), n2 (backend b3), n3 (client pod c3, no LB programs): NodePort from c3
    through n1 to b3 with the LB of n1 and n2 in mode ``request.param`` ("snat" / "dsr")."""
    mode: str = request.param
    salt = "d" + secrets.token_hex(3)
    pin_root = PIN_ROOT / f"test-{salt}"
    cluster = DevCluster(salt=salt, state_dir=tmp_path / "state")
    lbs: dict[str, LbDatapath] = {}
    procs: list[subprocess.Popen[bytes]] = []
    c = LbCluster(cluster, salt, lbs, {})
    try:
        for n in ("n1", "n2", "n3"):
            cluster.add_node(n)
        node, ip = BACKENDS["b3"]
        c.pods["b3"] = cluster.add_pod(node, "default", "b3", ip, [], [])
        procs.append(_serve(c.pods["b3"], "b3"))
        c.pods["c3"] = cluster.add_pod("n3", "default", "c3", "10.244.3.20", [], [])
        for n in ("n1", "n2"):
            other = [cluster.nodes[o].ip for o in cluster.nodes if o != n]
            lb = LbDatapath(n, pin_root, node_ip=cluster.nodes[n].ip, maglev_m=MAGLEV_M,
                            sizes=SIZES, mode=mode)
            lbs[n] = lb
            lb.set_node_addresses([cluster.nodes[n].ip], other)
            lb.attach_nodeport("eth0", cluster.nodes[n].netns)
        yield c
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            p.wait()
            if p.stdout:
                p.stdout.close()
        for lb in lbs.values():
            with contextlib.suppress(Exception):
                lb.destroy()
        cluster.destroy()
        if pin_root.exists():
            for d in pin_root.iterdir():
                unpin(d)
            pin_root.rmdir()

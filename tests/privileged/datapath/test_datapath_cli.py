"""``pod exec`` passes exit codes through and runs inside the pod; ``bpf`` commands read the
pinned maps as loaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from services.datapath.cli import bpf, pod
from services.datapath.core.plan import desired_state
from services.datapath.loader import Datapath
from services.datapath.sandbox import DevCluster

pytestmark = pytest.mark.privileged


def test_pod_exec_and_bpf_listing(cluster: DevCluster, datapaths: dict[str, Datapath],
                                  pin_root: Path) -> None:
    p = cluster.add_pod("n1", "ns1", "web", "10.244.7.1", [80], [])
    assert cluster.state_dir is not None
    runner = CliRunner()
    base = ["exec", "ns1/web", "--state-dir", str(cluster.state_dir)]
    res = runner.invoke(pod, [*base, "--", "sh", "-c", "exit 7"])
    assert res.exit_code == 7
    res = runner.invoke(pod, [*base, "--", "sh", "-c", "ip -o addr show eth0 | grep -q 10.244.7.1"])
    assert res.exit_code == 0
    assert runner.invoke(pod, ["exec", "ns1/nope", "--state-dir", str(cluster.state_dir), "--",
                               "true"]).exit_code == 1

    dp = datapaths["n1"]
    dp.attach(p.ifname, cluster.nodes["n1"].netns)
    dp.sync(desired_state(
        node="n1", endpoints=[{"id": 1, "identity": 400, "ips": ["10.244.7.1"], "node": "n1"}],
        ipcache=[{"prefix": "10.244.7.1/32", "identity": 400}],
        policies={400: {"identity": 400, "enforce": {"ingress": True}, "entries": [
            {"peer": 0, "direction": "ingress", "proto": 6, "port": 80, "port_prefixlen": 16,
             "deny": False}]}}))
    res = runner.invoke(bpf, ["ipcache", "list", "--pin-root", str(pin_root), "-o", "json"])
    assert res.exit_code == 0, res.output
    assert {"node": "n1", "prefix": "10.244.7.1/32", "identity": 400} in json.loads(res.output)
    res = runner.invoke(bpf, ["policy", "get", "400", "--pin-root", str(pin_root), "-o", "json"])
    rows = json.loads(res.output)
    assert [(r["port"], r["verdict"], r["direction"]) for r in rows] == [(80, "allow", "INGRESS")]
    res = runner.invoke(bpf, ["ct", "list", "global", "--pin-root", str(pin_root)])
    assert res.exit_code == 0, res.output

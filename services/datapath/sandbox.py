"""Dev-mode pod sandboxes and a multi-node dev cluster, all inside namespaces we create.

A node is a network namespace with ``eth0`` on a bridge that lives in its own namespace with no
uplink; a pod is a network namespace with ``eth0`` (its IP as /32, default route via a
link-local gateway with a static neighbour) whose peer ``lxc<hash>`` sits in the node namespace,
plus a cgroup v2 directory. Pods on other nodes are reached by per-pod /32 routes via their
node's address. Nothing has a route to the real uplink, so no test packet leaves the machine.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute, netns

CGROUP_ROOT = Path("/sys/fs/cgroup/unified/ciliate")
GATEWAY_IP = "169.254.1.1"
NODE_SUBNET = ipaddress.IPv4Network("10.99.0.0/24")
REPO_ROOT = Path(__file__).resolve().parents[2]


def short_hash(*parts: str, length: int = 10) -> str:
    return hashlib.sha256("/".join(parts).encode()).hexdigest()[:length]


def lxc_name(*parts: str) -> str:
    """Host-side veth name like Cilium's: ``lxc`` + 11 hex chars (14 <= IFNAMSIZ-1)."""
    return "lxc" + short_hash(*parts, length=11)


def default_state_dir() -> Path:
    env = os.environ.get("CILIATE_STATE_DIR")
    return Path(env) if env else Path.home() / ".local" / "state" / "ciliate"


def _sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


def _sysctl(ns: str, *settings: str) -> None:
    _sh("ip", "netns", "exec", ns, "sysctl", "-qw", *settings)


def _wait_for(cond: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.01)


@dataclass
class PodRecord:
    """What ``ciliate pod exec`` needs to enter a pod; written to <state>/pods/<ns>.<name>.json."""

    namespace: str
    name: str
    node: str
    netns: str
    ifname: str
    ip: str
    cgroup: str
    node_netns: str
    server_pid: int = 0

    @property
    def key(self) -> str:
        return f"{self.namespace}.{self.name}"


@dataclass
class PodSandbox:
    record: PodRecord
    server: subprocess.Popen[bytes] | None = None

    @property
    def netns(self) -> str:
        return self.record.netns

    @property
    def ip(self) -> str:
        return self.record.ip

    @property
    def ifname(self) -> str:
        return self.record.ifname


def enter_cgroup(cgroup: str) -> None:
    """Move the calling process into ``cgroup`` (used as a preexec_fn)."""
    (Path(cgroup) / "cgroup.procs").write_text(str(os.getpid()))


def create_pod(
    *, node: str, node_netns: str, namespace: str, name: str, ip: str,
    tcp_ports: list[int], udp_ports: list[int], salt: str = "", state_dir: Path | None = None,
) -> PodSandbox:
    """Netns + veth + addresses + routes + static neighbours + cgroup + server process."""
    h = short_hash(salt, node, namespace, name)
    pod_ns = f"cil-{h}"
    host_if = lxc_name(salt, node, namespace, name)
    tmp_if = "tmp" + h
    cgroup = CGROUP_ROOT / (salt + node if salt else node) / f"{namespace}.{name}"
    rec = PodRecord(namespace, name, node, pod_ns, host_if, ip, str(cgroup), node_netns)
    pod = PodSandbox(rec)
    try:
        netns.create(pod_ns)
        with IPRoute(netns=node_netns) as ipr:
            ipr.link("add", ifname=host_if, kind="veth", peer=tmp_if)
            host_idx = ipr.link_lookup(ifname=host_if)[0]
            tmp_idx = ipr.link_lookup(ifname=tmp_if)[0]
            ipr.link("set", index=tmp_idx, net_ns_fd=pod_ns)
            ipr.link("set", index=host_idx, state="up")
            host_mac = ipr.get_links(host_idx)[0].get_attr("IFLA_ADDRESS")
        with IPRoute(netns=pod_ns) as ipr:
            idx = ipr.link_lookup(ifname=tmp_if)[0]
            ipr.link("set", index=idx, ifname="eth0")
            ipr.link("set", index=idx, state="up")
            lo = ipr.link_lookup(ifname="lo")[0]
            ipr.link("set", index=lo, state="up")
            ipr.addr("add", index=idx, address=ip, prefixlen=32)
            ipr.route("add", dst=f"{GATEWAY_IP}/32", oif=idx, scope=253)
            ipr.route("add", dst="0.0.0.0/0", gateway=GATEWAY_IP, oif=idx)
            ipr.neigh("add", dst=GATEWAY_IP, lladdr=host_mac, ifindex=idx, state=0x80)
            pod_mac = ipr.get_links(idx)[0].get_attr("IFLA_ADDRESS")
        with IPRoute(netns=node_netns) as ipr:
            ipr.route("add", dst=f"{ip}/32", oif=host_idx, scope=253)
            ipr.neigh("add", dst=ip, lladdr=pod_mac, ifindex=host_idx, state=0x80)
        cgroup.mkdir(parents=True, exist_ok=True)
        if tcp_ports or udp_ports:
            pod.server = _start_server(rec, tcp_ports, udp_ports)
            rec.server_pid = pod.server.pid
        if state_dir is not None:
            write_record(state_dir, rec)
    except BaseException:
        delete_pod(pod, state_dir=state_dir)
        raise
    return pod


def _start_server(rec: PodRecord, tcp: list[int], udp: list[int]) -> subprocess.Popen[bytes]:
    args = ["ip", "netns", "exec", rec.netns, sys.executable, "-m",
            "services.datapath.podserver", "--name", f"{rec.namespace}/{rec.name}"]
    args += [a for p in tcp for a in ("--tcp", str(p))]
    args += [a for p in udp for a in ("--udp", str(p))]
    proc = subprocess.Popen(
        args, stdout=subprocess.PIPE, cwd=REPO_ROOT, start_new_session=True,
        preexec_fn=lambda: enter_cgroup(rec.cgroup),
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != b"ready":
        proc.kill()
        proc.wait()
        raise RuntimeError(f"pod server for {rec.namespace}/{rec.name} did not start")
    return proc


def delete_pod(pod: PodSandbox, state_dir: Path | None = None) -> None:
    """Remove everything create_pod made; safe on a half-made pod."""
    rec = pod.record
    if pod.server is not None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pod.server.pid, signal.SIGKILL)
        pod.server.wait()
        if pod.server.stdout:
            pod.server.stdout.close()
    with contextlib.suppress(Exception), IPRoute(netns=rec.node_netns) as ipr:
        found = ipr.link_lookup(ifname=rec.ifname)
        if found:
            ipr.link("del", index=found[0])
    with contextlib.suppress(Exception), IPRoute(netns=rec.node_netns) as ipr:
        ipr.route("del", dst=f"{rec.ip}/32")
    if rec.netns in netns.listnetns():
        netns.remove(rec.netns)
    cg = Path(rec.cgroup)
    if cg.exists():
        _kill_cgroup(cg)
        _wait_for(lambda: _rmdir_ok(cg), 5.0, f"remove cgroup {cg}")
    if state_dir is not None:
        (state_dir / "pods" / f"{rec.key}.json").unlink(missing_ok=True)


def _kill_cgroup(cg: Path) -> None:
    for line in (cg / "cgroup.procs").read_text().split():
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(line), signal.SIGKILL)


def _rmdir_ok(p: Path) -> bool:
    try:
        p.rmdir()
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True


def write_record(state_dir: Path, rec: PodRecord) -> None:
    d = state_dir / "pods"
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{rec.key}.json").write_text(json.dumps(asdict(rec)))


def read_record(state_dir: Path, namespace: str, name: str) -> PodRecord:
    path = state_dir / "pods" / f"{namespace}.{name}.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise LookupError(f"no dev-mode pod {namespace}/{name} in {state_dir}") from None
    return PodRecord(**data)


def pod_exec(rec: PodRecord, cmd: list[str]) -> int:
    """Run ``cmd`` in the pod's network namespace and cgroup; returns its exit code."""
    proc = subprocess.run(["ip", "netns", "exec", rec.netns, *cmd],
                          preexec_fn=lambda: enter_cgroup(rec.cgroup), check=False)
    return proc.returncode


# --- nodes and the cluster -------------------------------------------------------------------

@dataclass
class NodeSandbox:
    name: str
    netns: str
    ip: str
    pods: dict[str, PodSandbox] = field(default_factory=dict)


@dataclass
class DevCluster:
    """Nodes joined by a bridge in a namespace with no uplink; per-pod /32 routes between them.

    ``salt`` goes into every name so parallel runs never collide.
    """

    salt: str
    state_dir: Path | None = None
    nodes: dict[str, NodeSandbox] = field(default_factory=dict)
    bridge_netns: str = ""

    def __post_init__(self) -> None:
        self.bridge_netns = f"cil-{short_hash(self.salt, 'bridge')}"

    def _ensure_bridge(self) -> None:
        if self.bridge_netns in netns.listnetns():
            return
        netns.create(self.bridge_netns)
        with IPRoute(netns=self.bridge_netns) as ipr:
            ipr.link("add", ifname="br0", kind="bridge")
            ipr.link("set", index=ipr.link_lookup(ifname="br0")[0], state="up")

    def add_node(self, name: str) -> NodeSandbox:
        self._ensure_bridge()
        ip = str(NODE_SUBNET.network_address + len(self.nodes) + 1)
        node_ns = f"cil-{short_hash(self.salt, 'node', name)}"
        node = NodeSandbox(name, node_ns, ip)
        self.nodes[name] = node
        netns.create(node_ns)
        br_if = "n" + short_hash(self.salt, name, length=12)
        with IPRoute(netns=self.bridge_netns) as ipr:
            ipr.link("add", ifname=br_if, kind="veth", peer="eth0")
            br_idx = ipr.link_lookup(ifname=br_if)[0]
            peer_idx = ipr.link_lookup(ifname="eth0")[0]
            ipr.link("set", index=peer_idx, net_ns_fd=node_ns)
            ipr.link("set", index=br_idx, master=ipr.link_lookup(ifname="br0")[0], state="up")
        with IPRoute(netns=node_ns) as ipr:
            idx = ipr.link_lookup(ifname="eth0")[0]
            ipr.link("set", index=idx, state="up")
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
            ipr.addr("add", index=idx, address=ip, prefixlen=NODE_SUBNET.prefixlen)
        _sysctl(node_ns, "net.ipv4.ip_forward=1", "net.ipv4.conf.all.rp_filter=0",
                "net.ipv4.conf.default.rp_filter=0")
        return node

    def add_pod(self, node: str, namespace: str, name: str, ip: str,
                tcp_ports: list[int], udp_ports: list[int]) -> PodSandbox:
        n = self.nodes[node]
        pod = create_pod(node=node, node_netns=n.netns, namespace=namespace, name=name, ip=ip,
                         tcp_ports=tcp_ports, udp_ports=udp_ports, salt=self.salt,
                         state_dir=self.state_dir)
        n.pods[f"{namespace}/{name}"] = pod
        for other in self.nodes.values():
            if other is not n:
                with IPRoute(netns=other.netns) as ipr:
                    ipr.route("add", dst=f"{ip}/32", gateway=n.ip)
        return pod

    def remove_pod(self, node: str, namespace: str, name: str) -> None:
        n = self.nodes[node]
        pod = n.pods.pop(f"{namespace}/{name}")
        for other in self.nodes.values():
            if other is not n:
                with contextlib.suppress(Exception), IPRoute(netns=other.netns) as ipr:
                    ipr.route("del", dst=f"{pod.ip}/32")
        delete_pod(pod, state_dir=self.state_dir)

    def pods(self) -> dict[str, PodSandbox]:
        return {k: p for n in self.nodes.values() for k, p in n.pods.items()}

    def destroy(self) -> None:
        """Remove every pod, node and the bridge; keeps going past errors."""
        for n in self.nodes.values():
            for key in list(n.pods):
                with contextlib.suppress(Exception):
                    delete_pod(n.pods.pop(key), state_dir=self.state_dir)
            if n.netns in netns.listnetns():
                netns.remove(n.netns)
            cg = CGROUP_ROOT / (self.salt + n.name)
            if cg.exists():
                _rmdir_ok(cg)
        self.nodes.clear()
        if self.bridge_netns in netns.listnetns():
            netns.remove(self.bridge_netns)

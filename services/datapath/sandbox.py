"""Dev-mode pod sandboxes and a multi-node dev cluster, all inside namespaces we create.

A node is a network namespace with ``eth0`` on a bridge that lives in its own namespace with no
uplink; a pod is a network namespace with ``eth0`` (its IP as /32, default route via a
link-local gateway with a static neighbour) whose peer ``lxc<hash>`` sits in the node namespace,
plus a cgroup v2 directory. Pods on other nodes are reached by per-pod /32 routes via their
node's address. Nothing has a route to the real uplink, so no test packet leaves the machine.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute, netns

from ciliate.devcluster import CGROUP_ROOT as CGROUP_ROOT  # re-exported: tests, benches
from ciliate.devcluster import node_cgroup as node_cgroup
from ciliate.devcluster import short_hash
from services.datapath.core.images import http_demo_ports

GATEWAY_IP = "169.254.1.1"
NODE_SUBNET = ipaddress.IPv4Network("10.99.0.0/24")
REPO_ROOT = Path(__file__).resolve().parents[2]
LOCK_DIR = Path("/run/ciliate")


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
    """"" = the agent's own namespace (a real node)."""
    server_pid: int = 0
    container_id: str = ""
    """Set for a sandbox a container runtime made and handed over by CNI ADD: ``netns`` is then
    the runtime's path (``/var/run/netns/x``, ``/proc/PID/ns/net``), the runtime owns it and
    the pod has no cgroup of ours."""

    @property
    def key(self) -> str:
        return f"{self.namespace}.{self.name}"


def _ipr(ns: str | None) -> IPRoute:
    return IPRoute(netns=ns) if ns else IPRoute()


def netns_exists(ns: str) -> bool:
    """A named namespace (``ip netns``) or a runtime's path to one."""
    return os.path.exists(ns) if ns.startswith("/") else ns in netns.listnetns()


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
    on_link: Callable[[str, str], None] | None = None, images: Sequence[str] = (),
) -> PodSandbox:
    """Netns + veth + addresses + routes + static neighbours + cgroup + server process.

    ``on_link(host_ifname, node_netns)`` runs as soon as the host veth exists, before the pod
    has an address: the agent attaches its programs there, so no packet passes unjudged.
    """
    h = short_hash(salt, node, namespace, name)
    pod_ns = f"cil-{h}"
    host_if = lxc_name(salt, node, namespace, name)
    tmp_if = "tmp" + h
    cgroup = node_cgroup(salt, node) / f"{namespace}.{name}"
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
        if on_link is not None:
            on_link(host_if, node_netns)
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
            pod.server = _start_server(rec, tcp_ports, udp_ports,
                                       http_demo_ports(images, tcp_ports))
            rec.server_pid = pod.server.pid
        if state_dir is not None:
            write_record(state_dir, rec)
    except BaseException:
        delete_pod(pod, state_dir=state_dir)
        raise
    return pod


def _start_server(
    rec: PodRecord, tcp: list[int], udp: list[int], http_demo: list[int]
) -> subprocess.Popen[bytes]:
    args = ["ip", "netns", "exec", rec.netns, sys.executable, "-m",
            "services.datapath.podserver", "--name", f"{rec.namespace}/{rec.name}"]
    args += [a for p in tcp for a in ("--tcp", str(p))]
    args += [a for p in udp for a in ("--udp", str(p))]
    args += [a for p in http_demo for a in ("--http-demo", str(p))]
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


def release_pod(pod: PodSandbox) -> None:
    """Leave the pod running for the next agent: drop our pipe and child handle to its server
    (it stays in the pod's cgroup, where delete_pod finds and kills it later)."""
    if pod.server is not None:
        if pod.server.stdout:
            pod.server.stdout.close()
        pod.server.returncode = 0  # not ours to reap any more; silences Popen's "still running"
        pod.server = None


NETNS_ETC = Path("/etc/netns")
"""``ip netns exec NS`` bind-mounts the files of ``/etc/netns/NS/`` over ``/etc``."""


def write_pod_hosts(rec: PodRecord, text: str) -> None:
    """The dev pod's /etc/hosts (``core.hosts``); only for namespaces we named and made."""
    if rec.container_id or rec.netns.startswith("/"):
        return
    path = NETNS_ETC / rec.netns / "hosts"
    with contextlib.suppress(FileNotFoundError):
        if path.read_text() == text:
            return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def delete_pod(pod: PodSandbox, state_dir: Path | None = None) -> None:
    """Remove everything create_pod made; safe on a half-made pod."""
    rec = pod.record
    if pod.server is not None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pod.server.pid, signal.SIGKILL)
        pod.server.wait()
        if pod.server.stdout:
            pod.server.stdout.close()
    with contextlib.suppress(Exception), _ipr(rec.node_netns) as ipr:
        found = ipr.link_lookup(ifname=rec.ifname)
        if found:
            ipr.link("del", index=found[0])
    with contextlib.suppress(Exception), _ipr(rec.node_netns) as ipr:
        ipr.route("del", dst=f"{rec.ip}/32")
    if not rec.container_id and rec.netns in netns.listnetns():
        netns.remove(rec.netns)  # a runtime's namespace is the runtime's to remove
    if not rec.container_id and not rec.netns.startswith("/"):
        shutil.rmtree(NETNS_ETC / rec.netns, ignore_errors=True)
    cg = Path(rec.cgroup) if rec.cgroup else None
    if cg is not None and cg.exists():
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
    tmp = d / f".{rec.key}.json.tmp"
    tmp.write_text(json.dumps(asdict(rec)))
    tmp.replace(d / f"{rec.key}.json")  # readers never see a half-written record


def read_record(state_dir: Path, namespace: str, name: str) -> PodRecord:
    path = state_dir / "pods" / f"{namespace}.{name}.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise LookupError(f"no dev-mode pod {namespace}/{name} in {state_dir}") from None
    return PodRecord(**data)


def pod_exec(rec: PodRecord, cmd: list[str]) -> int:
    """Run ``cmd`` in the pod's network namespace and cgroup (a CNI pod has none of ours);
    returns its exit code."""
    enter = (["nsenter", f"--net={rec.netns}"] if rec.netns.startswith("/")
             else ["ip", "netns", "exec", rec.netns])
    proc = subprocess.run([*enter, *cmd], check=False,
                          preexec_fn=(lambda: enter_cgroup(rec.cgroup)) if rec.cgroup else None)
    return proc.returncode


# --- nodes and the cluster -------------------------------------------------------------------

@dataclass
class NodeSandbox:
    name: str
    netns: str
    ip: str
    pods: dict[str, PodSandbox] = field(default_factory=dict)


def node_ip_for(name: str) -> str:
    """A node's address on the dev bridge, the same in every agent: ``node-N`` gets .N, other
    names a stable hashed host number (100..249)."""
    prefix, _, num = name.rpartition("-")
    if prefix and num.isdigit() and 1 <= int(num) <= 99:
        host = int(num)
    else:
        host = 100 + int(short_hash(name), 16) % 150
    return str(NODE_SUBNET.network_address + host)


def bridge_netns_name(salt: str) -> str:
    return f"cil-{short_hash(salt, 'bridge')}"


def node_netns_name(salt: str, name: str) -> str:
    return f"cil-{short_hash(salt, 'node', name)}"


@contextlib.contextmanager
def cluster_lock(salt: str) -> Any:
    """Serialises bridge and node set-up between agents (separate processes) of one cluster."""
    LOCK_DIR.mkdir(parents=True, exist_ok=True)
    path = LOCK_DIR / f"devcluster-{short_hash(salt, 'lock')}.lock"
    with path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_bridge(salt: str) -> str:
    """The bridge namespace of cluster ``salt``; created by whichever agent comes first."""
    ns = bridge_netns_name(salt)
    if ns not in netns.listnetns():
        netns.create(ns)
    with IPRoute(netns=ns) as ipr:
        if not ipr.link_lookup(ifname="br0"):
            ipr.link("add", ifname="br0", kind="bridge")
        ipr.link("set", index=ipr.link_lookup(ifname="br0")[0], state="up")
    return ns


def ensure_node(salt: str, name: str, ip: str | None = None) -> NodeSandbox:
    """Node ``name``'s namespace joined to the bridge; adopts it when it already exists."""
    ip = ip or node_ip_for(name)
    bridge = ensure_bridge(salt)
    node_ns = node_netns_name(salt, name)
    node = NodeSandbox(name, node_ns, ip)
    if node_ns in netns.listnetns():
        with IPRoute(netns=node_ns) as ipr:
            if ipr.link_lookup(ifname="eth0"):
                return node
        netns.remove(node_ns)  # half-made by an agent that died: start over
    netns.create(node_ns)
    br_if = "n" + short_hash(salt, name, length=12)
    with IPRoute(netns=bridge) as ipr:
        for stale in ipr.link_lookup(ifname=br_if):
            ipr.link("del", index=stale)
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


def remove_node(salt: str, name: str) -> None:
    """Remove node ``name``'s namespace and cgroup, and the bridge once no node uses it."""
    node_ns = node_netns_name(salt, name)
    if node_ns in netns.listnetns():
        netns.remove(node_ns)
    cg = node_cgroup(salt, name)
    if cg.exists():
        _rmdir_ok(cg)
    bridge = bridge_netns_name(salt)
    if bridge not in netns.listnetns():
        return
    with IPRoute(netns=bridge) as ipr:
        br = ipr.link_lookup(ifname="br0")
        ports = [link for link in ipr.get_links() if br and link.get_attr("IFLA_MASTER") == br[0]]
    if not ports:
        netns.remove(bridge)


def set_remote_route(node_netns: str, ip: str, via: str | None) -> None:
    """Route a pod on another node (``via`` its node address), or remove it (``via`` None)."""
    with IPRoute(netns=node_netns) as ipr:
        if via is None:
            with contextlib.suppress(Exception):
                ipr.route("del", dst=f"{ip}/32")
        else:
            ipr.route("replace", dst=f"{ip}/32", gateway=via)


def adopt_pod(state_dir: Path, namespace: str, name: str) -> PodSandbox | None:
    """A pod an earlier agent made or CNI handed over (record, namespace and host veth still
    there), else None."""
    try:
        rec = read_record(state_dir, namespace, name)
    except (LookupError, ValueError, TypeError):
        return None
    if not netns_exists(rec.netns):
        return None
    with _ipr(rec.node_netns) as ipr:
        if not ipr.link_lookup(ifname=rec.ifname):
            return None
    return PodSandbox(rec)


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
        self.bridge_netns = bridge_netns_name(self.salt)

    def add_node(self, name: str) -> NodeSandbox:
        ip = str(NODE_SUBNET.network_address + len(self.nodes) + 1)
        with cluster_lock(self.salt):
            node = ensure_node(self.salt, name, ip)
        self.nodes[name] = node
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

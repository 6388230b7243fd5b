"""Wires the datapath agent (one per node): KV `endpoints`/`ipcache`/`policy`/`identities`/`nodes`
/`lb` in, pod sandboxes (dev mode), BPF maps and tc/cgroup programs (policy, L7 redirect,
service LB), flow events out on ``flows.<node>``.

Every blocking kernel operation (bcc compile, netlink, map writes, ring-buffer polls) runs on a
worker thread, so the asyncio loop keeps serving NATS, heartbeats and /metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from pyroute2 import config as pyroute2_config

from ciliate.api import REGISTRY_KEY
from ciliate.bus import BatchPublisher, Bucket, KVMirror
from ciliate.bus.subjects import flows as flows_subject
from ciliate.devcluster import cluster_salt
from ciliate.flows.codec import pack_envelope
from ciliate.flows.tables import TrafficDirection, drop_reason_text
from ciliate.runner import ServiceContext, ServiceSpec

from .cni.agent import CniAgent, tc_program_names
from .core.flows import FlowContext, event_to_flow
from .core.hosts import hosts_file
from .core.model import EndpointFlag, EnforcementMode
from .core.plan import DesiredState, desired_state
from .lb.loader import LbDatapath, LbSizes
from .loader import (
    Datapath,
    MapSizes,
    MonitorAggregation,
    MonitorConfig,
    PolicyVerdictLog,
    parse_tcp_flags,
)
from .maps import PIN_ROOT
from .proxy.core.fqdn import DEFAULT_MIN_TTL, FQDNCache
from .proxy.core.policy import PolicyView
from .proxy.dns_proxy import DNSProxy, Learner
from .proxy.http_proxy import HTTPProxy
from .proxy.loader import ProxyDatapath
from .sandbox import (
    PodRecord,
    PodSandbox,
    adopt_pod,
    cluster_lock,
    create_pod,
    delete_pod,
    ensure_node,
    node_cgroup,
    node_ip_for,
    release_pod,
    remove_node,
    set_remote_route,
    write_pod_hosts,
    write_record,
)

T = TypeVar("T")

DEBOUNCE_S = 0.05
MAX_ERRORS = 20
SMALL_MAPS = MapSizes(ct_tcp=8192, ct_any=8192, ipcache=4096, endpoints=1024, policy=16384,
                      events_pages=64)
SMALL_LB_MAPS = LbSizes(services=4096, backends=4096, revnat=4096, sk_revnat=8192,
                        affinity=4096, ct=8192, maglev_tables=256, events_pages=16)


def _flag(value: str | None, default: bool) -> bool:
    if value is None or value == "":
        return default
    return value.lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class AgentConfig:
    """Agent options: ``Settings.extra`` first (tests), then ``CILIATE_*`` environment."""

    node: str
    state_dir: Path
    dev_mode: bool
    teardown: bool
    """On shutdown remove sandboxes, node and pinned maps (the dev default: Ctrl-C on
    ``ciliate up`` removes the dev cluster). Off: filters and maps stay, so a restart keeps
    connections."""
    cluster: str
    pin_root: Path
    sizes: MapSizes
    enforcement: EnforcementMode
    audit: bool
    monitor: MonitorConfig
    ct_gc_interval_s: float
    metrics_interval_s: float
    l7_proxy: bool = True
    """Cilium's ``enable-l7-proxy``: the redirect program and the node's HTTP/DNS proxies."""
    cni: bool = False
    """Serve ciliate-cni's REST (docs/k8s.md): on by default outside dev mode."""
    pod_cidr: str = ""
    lb: bool = True
    """Cilium's ``kube-proxy-replacement``: service LB programs fed by KV `lb`."""
    lb_sizes: LbSizes = field(default_factory=LbSizes)
    maglev_m: int = 16381
    """``bpf-lb-maglev-table-size``: must equal the lb service's M (other tables fall back)."""
    lb_mode: str = "snat"
    """``bpf-lb-mode``: ``snat`` or ``dsr`` for NodePort to backends on other nodes (the same on
    every node: the backend's node decodes the DSR option)."""
    lb_cgroup: str = ""
    """Where the socket LB attaches: the node's cgroup subtree in dev mode; outside it only
    when ``CILIATE_LB_CGROUP_ROOT`` names one (the host's cgroup root would translate every
    process on the machine, which an agent must not assume it may do)."""
    node_netns: str = ""
    """Outside dev mode: the named network namespace that is the node's (tests); "" = ours."""
    fqdn_min_ttl: int = DEFAULT_MIN_TTL
    """Cilium's ``tofqdns-min-ttl``: learned FQDN IPs live at least this long (seconds)."""

    @classmethod
    def from_context(cls, ctx: ServiceContext) -> AgentConfig:
        s = ctx.settings

        def opt(key: str) -> str | None:
            return s.extra.get(key.lower()) or os.environ.get(f"CILIATE_{key}")

        cluster = cluster_salt(s)
        return cls(
            node=s.node,
            state_dir=s.state_dir,
            dev_mode=s.dev_mode,
            teardown=_flag(opt("DEV_TEARDOWN"), s.dev_mode),
            cluster=cluster,
            pin_root=Path(opt("BPF_PIN_ROOT") or PIN_ROOT),
            sizes=SMALL_MAPS if opt("BPF_MAP_SIZES") == "small" else MapSizes(),
            enforcement=EnforcementMode(opt("POLICY_ENFORCEMENT") or "default"),
            audit=_flag(opt("POLICY_AUDIT_MODE"), False),
            monitor=MonitorConfig(
                MonitorAggregation[(opt("MONITOR_AGGREGATION") or "medium").upper()],
                int(opt("MONITOR_AGGREGATION_INTERVAL") or 5),
                PolicyVerdictLog[(opt("POLICY_VERDICT_LOG") or "denied").upper()],
                parse_tcp_flags(opt("MONITOR_AGGREGATION_FLAGS") or "syn,fin,rst")),
            ct_gc_interval_s=float(opt("CT_GC_INTERVAL") or 30),
            metrics_interval_s=float(opt("METRICS_INTERVAL") or 5),
            l7_proxy=_flag(opt("L7_PROXY"), True),
            cni=_flag(opt("CNI"), not s.dev_mode),
            pod_cidr=opt("POD_CIDR") or default_pod_cidr(s.node),
            lb=_flag(opt("KUBE_PROXY_REPLACEMENT"), True),
            lb_sizes=SMALL_LB_MAPS if opt("BPF_MAP_SIZES") == "small" else LbSizes(),
            maglev_m=int(opt("BPF_LB_MAGLEV_TABLE_SIZE") or 16381),
            lb_mode=opt("BPF_LB_MODE") or "snat",
            lb_cgroup=opt("LB_CGROUP_ROOT") or (
                str(node_cgroup(cluster, s.node)) if s.dev_mode else ""),
            node_netns=opt("NODE_NETNS") or "",
            fqdn_min_ttl=int(opt("TOFQDNS_MIN_TTL") or DEFAULT_MIN_TTL),
        )


def default_pod_cidr(node: str) -> str:
    """A /24 per node from 10.244.0.0/16, numbered like the node's dev address (node-N: N)."""
    return f"10.244.{node_ip_for(node).rsplit('.', 1)[1]}.0/24"


def mount_cni(app: web.Application, cfg: AgentConfig, node_netns: str | None,
              host: DatapathAgent | None = None) -> CniAgent | None:
    """The CNI handlers on the agent's app, when enabled; attachments persist per node. With
    ``host`` (outside dev mode) CNI pods become the agent's endpoints (cni/agent.py)."""
    if not cfg.cni:
        return None
    agent = CniAgent(cfg.pod_cidr, cfg.state_dir / "cni" / cfg.node, node_netns=node_netns,
                     host=host)
    agent.register(app)
    return agent


@dataclass
class Snapshot:
    """What /metrics and status show, refreshed off the loop."""

    counters: dict[tuple[int, int], tuple[int, int]] = field(default_factory=dict)
    map_usage: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (entries, max)
    enforcement: dict[str, int] = field(default_factory=dict)


class AgentCollector(Collector):
    """Cilium's agent metric names, from the last snapshot (scrapes never touch the kernel)."""

    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Any]:
        snap = self.snapshot()
        drops = CounterMetricFamily("cilium_drop_count", "Total dropped packets",
                                    labels=("reason", "direction"))
        forwards = CounterMetricFamily("cilium_forward_count", "Total forwarded packets",
                                       labels=("direction",))
        for (reason, direction), (packets, _) in sorted(snap.counters.items()):
            dname = _direction_name(direction)
            if reason == 0:
                forwards.add_metric((dname,), packets)
            else:
                drops.add_metric((drop_reason_text(reason), dname), packets)
        yield drops
        yield forwards
        pressure = GaugeMetricFamily("cilium_bpf_map_pressure",
                                     "Fill percentage of a BPF map (0..1)", labels=("map_name",))
        for name, (entries, size) in sorted(snap.map_usage.items()):
            pressure.add_metric((name,), entries / size if size else 0.0)
        yield pressure
        enforcement = GaugeMetricFamily("cilium_policy_endpoint_enforcement_status",
                                        "Endpoints by policy enforcement", labels=("enforcement",))
        for name, n in sorted(snap.enforcement.items()):
            enforcement.add_metric((name,), n)
        yield enforcement


def _direction_name(direction: int) -> str:
    if direction in TrafficDirection._value2member_map_:
        return TrafficDirection(direction).name
    return "UNKNOWN"


def enforcement_counts(state: DesiredState) -> dict[str, int]:
    """Endpoints per enforcement ("ingress", "egress", "both", "none"), as Cilium counts them."""
    out = {"ingress": 0, "egress": 0, "both": 0, "none": 0}
    seen: set[int] = set()
    for ep in state.endpoints.values():
        if ep.endpoint_id in seen:
            continue
        seen.add(ep.endpoint_id)
        i = EndpointFlag.ENFORCE_INGRESS in ep.flags
        e = EndpointFlag.ENFORCE_EGRESS in ep.flags
        out["both" if i and e else "ingress" if i else "egress" if e else "none"] += 1
    return out


def remote_routes(node: str, endpoints: Mapping[str, Mapping[str, Any]],
                  nodes: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """{pod IP: node address} for pods on other nodes whose node has registered an address."""
    out: dict[str, str] = {}
    for ep in endpoints.values():
        other = str(ep.get("node", ""))
        if other == node or other not in nodes:
            continue
        addresses = nodes[other].get("addresses") or []
        if not addresses:
            continue
        for ip in ep.get("ips", ()):
            if ":" not in str(ip):
                out[str(ip)] = str(addresses[0])
    return out


def local_pods(node: str, endpoints: Mapping[str, Mapping[str, Any]]
               ) -> dict[str, Mapping[str, Any]]:
    """Endpoints of ``node`` that have an IPv4 address, by KV key."""
    return {k: ep for k, ep in endpoints.items()
            if ep.get("node") == node and any(":" not in str(ip) for ip in ep.get("ips", ()))}


def node_addresses(node: str, nodes: Mapping[str, Mapping[str, Any]]
                   ) -> tuple[list[str], list[str]]:
    """(this node's, other nodes') IPv4 addresses from KV `nodes`: where NodePorts answer."""
    local: list[str] = []
    remote: list[str] = []
    for name, value in sorted(nodes.items()):
        for addr in value.get("addresses") or ():
            if ":" not in str(addr):
                (local if name == node else remote).append(str(addr))
    return local, remote


def _pod_ip(ep: Mapping[str, Any]) -> str:
    return next(str(ip) for ip in ep.get("ips", ()) if ":" not in str(ip))


def _ports(ep: Mapping[str, Any], proto: str) -> list[int]:
    return sorted({int(p["port"]) for p in ep.get("ports", ()) if p.get("protocol") == proto})


class DatapathAgent:
    def __init__(self, ctx: ServiceContext, cfg: AgentConfig) -> None:
        self.ctx = ctx
        self.cfg = cfg
        self.node = cfg.node
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="datapath-worker")
        self.poller = ThreadPoolExecutor(1, thread_name_prefix="datapath-events")
        self.dp: Datapath | None = None
        self.pdp: ProxyDatapath | None = None
        self.lb: LbDatapath | None = None
        self.lb_pending: dict[str, None] = {}
        """KV `lb` keys changed since the last write (ordered; values read from the mirror)."""
        self.lb_dirty = asyncio.Event()
        self.lb_nodes: tuple[list[str], list[str]] | None = None
        self.cni: CniAgent | None = None
        self.view = PolicyView(node=cfg.node)
        """The L7 proxies' view of the KV buckets, fed by the same mirrors as the maps."""
        self.http_proxy: HTTPProxy | None = None
        self.dns_proxy: DNSProxy | None = None
        self.learner: Learner | None = None
        self.proxy_stop = asyncio.Event()
        self.node_netns: str | None = None
        self.node_ip = node_ip_for(cfg.node) if cfg.dev_mode else ""
        self.pods: dict[str, PodSandbox] = {}
        self.routes: dict[str, str] = {}
        self.applied = DesiredState()
        self.snapshot = Snapshot()
        self.ifnames: dict[int, str] = {}
        """Host veth names by ifindex, for the flows' ``interface``."""
        self.flow_ctx = FlowContext(cfg.node, ifnames=self.ifnames)
        self.dirty = asyncio.Event()
        self.ready = asyncio.Event()
        """Every mirror's snapshot is complete (maps may be written)."""
        self.reconcile_lock = asyncio.Lock()
        """Held by a reconcile and by a CNI hand-over, which reconciles itself."""
        self.endpoint_seen = asyncio.Event()
        self.mirrors: dict[Bucket, KVMirror] = {}
        self.publisher: BatchPublisher | None = None
        self.tasks: list[asyncio.Task[Any]] = []
        self.lost_seen = 0
        self.syncs = 0

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.worker, fn, *args)

    def error(self, message: str) -> None:
        self.ctx.log.error("%s", message)
        errors: list[str] = self.ctx.status.setdefault("errors", [])
        errors.append(message)
        del errors[:-MAX_ERRORS]

    # --- start ------------------------------------------------------------------------------

    async def start(self) -> None:
        cfg = self.cfg
        # pyroute2 forks helpers for namespace work; a forked child that inherits asyncio's
        # signal wake-up fd would turn pyroute2's SIGTERM of that child into our shutdown.
        pyroute2_config.disable_mp_signal = True
        if cfg.dev_mode:
            def make_node() -> str:
                with cluster_lock(cfg.cluster):
                    return ensure_node(cfg.cluster, cfg.node, self.node_ip).netns
            self.node_netns = await self._run(make_node)
        else:
            self.node_netns = cfg.node_netns or None
        self.cni = mount_cni(self.ctx.app, cfg, self.node_netns,
                             None if cfg.dev_mode else self)
        self.dp = await self._run(lambda: Datapath(cfg.node, sizes=cfg.sizes,
                                                   pin_root=cfg.pin_root, monitor=cfg.monitor))
        self.applied = await self._run(self.dp.read_state)
        if cfg.lb:
            try:
                self.lb = await self._run(self._make_lb)
            except Exception as exc:  # policy enforcement goes on without service LB
                self.error(f"service LB unavailable: {exc!r}")
        self.publisher = BatchPublisher(self.ctx.bus, flows_subject(cfg.node), source=cfg.node,
                                        encode=pack_envelope)
        self.publisher.start()
        if cfg.l7_proxy:
            await self.start_proxies()
        await self.register_node()
        for bucket in (Bucket.ENDPOINTS, Bucket.IPCACHE, Bucket.POLICY, Bucket.IDENTITIES,
                       Bucket.NODES):
            mirror = KVMirror(await self.ctx.bus.kv(bucket), self._on_change(bucket))
            self.mirrors[bucket] = mirror
            self.tasks.append(self.ctx.spawn(mirror.run(), name=f"mirror-{bucket.value}"))
        if self.lb is not None:
            self.lb_mirror = KVMirror(await self.ctx.bus.kv(Bucket.LB), self._on_lb_change)
            self.tasks += [self.ctx.spawn(self.lb_mirror.run(), name="mirror-lb"),
                           self.ctx.spawn(self.lb_loop(), name="lb")]
        self.tasks += [
            self.ctx.spawn(self.reconcile_loop(), name="reconcile"),
            self.ctx.spawn(self.events_loop(), name="events"),
            self.ctx.spawn(self.gc_loop(), name="ct-gc"),
            self.ctx.spawn(self.metrics_loop(), name="metrics"),
        ]
        self.ctx.app[REGISTRY_KEY].register(AgentCollector(lambda: self.snapshot))
        self.ctx.status.update({
            "node": cfg.node, "dev_mode": cfg.dev_mode, "enforcement": cfg.enforcement.value,
            "audit": cfg.audit, "monitor_aggregation": cfg.monitor.aggregation.name.lower(),
            "policy_verdict_log": cfg.monitor.policy_verdicts.name.lower(),
            "programs": self.dp.program_info(), "synced": False, "cni": self.cni is not None,
            "l7_proxy": self.pdp is not None,
            "lb": {"synced": False, "map_writes": 0} if self.lb is not None else None,
        })
        self.ctx.on_shutdown(self.stop)

    async def start_proxies(self) -> None:
        """The redirect program (its filter at tc prio 1, ahead of the datapath's prio 2),
        the node's policy route for marked packets, and the HTTP and DNS proxies listening in
        the node's namespace; their L7 flows share the node's flow publisher."""
        cfg = self.cfg
        assert self.publisher is not None
        self.pdp = await self._run(lambda: ProxyDatapath(cfg.node, sizes=cfg.sizes,
                                                         pin_root=cfg.pin_root))
        await self._run(self.pdp.setup_routing, self.node_netns)
        emit = self.publisher.add
        self.learner = Learner(self._request, FQDNCache(min_ttl=cfg.fqdn_min_ttl))
        self.http_proxy = HTTPProxy(self.view, emit, netns=self.node_netns)
        self.dns_proxy = DNSProxy(self.view, emit, learner=self.learner, netns=self.node_netns)
        await self.http_proxy.start()
        await self.dns_proxy.start()
        self.tasks.append(self.ctx.spawn(self.learner.run_expiry(self.proxy_stop),
                                         name="fqdn-expiry"))

    def _make_lb(self) -> LbDatapath:
        """LB programs and maps (compiled under the process-wide compile lock), the socket LB
        on the node's cgroup subtree and, in dev mode, the NodePort tc LB on the node's eth0."""
        cfg = self.cfg
        lb = LbDatapath(cfg.node, cfg.pin_root, node_ip=self.node_ip or "0.0.0.0",
                        maglev_m=cfg.maglev_m, sizes=cfg.lb_sizes, mode=cfg.lb_mode)
        try:
            if cfg.lb_cgroup:
                Path(cfg.lb_cgroup).mkdir(parents=True, exist_ok=True)
                lb.attach_socket_lb(cfg.lb_cgroup)
            if self.node_netns is not None:
                lb.attach_nodeport("eth0", self.node_netns)
        except Exception:
            lb.destroy()
            raise
        return lb

    async def _request(self, subject: str, payload: dict[str, Any]) -> Any:
        return await self.ctx.bus.request(subject, payload, timeout=5.0)

    def _attach(self, ifname: str, netns: str | None) -> None:
        """Datapath filters first, then the redirect (which must run before them)."""
        assert self.dp is not None
        self.ifnames[self.dp.attach(ifname, netns)] = ifname
        if self.pdp is not None:
            self.pdp.attach(ifname, netns)

    async def register_node(self) -> None:
        kv = await self.ctx.bus.kv(Bucket.NODES)
        value: dict[str, Any] = {"name": self.cfg.node,
                                 "addresses": [self.node_ip] if self.node_ip else [],
                                 "started": time.time(), "dev_mode": self.cfg.dev_mode}
        await kv.put(self.cfg.node, value)

    def _on_change(self, bucket: Bucket) -> Callable[[str, Any, Any], Any]:
        feed = {Bucket.ENDPOINTS: self.view.set_endpoint, Bucket.IPCACHE: self.view.set_ipcache,
                Bucket.POLICY: self.view.set_policy,
                Bucket.IDENTITIES: self.view.set_identity}.get(bucket)

        async def changed(key: str, old: Any, new: Any) -> None:
            if bucket is Bucket.NODES:
                self.lb_dirty.set()
            elif bucket is Bucket.ENDPOINTS:
                self.endpoint_seen.set()
            if feed is not None:
                try:
                    feed(key, new)
                except (ValueError, TypeError, KeyError, AttributeError) as exc:
                    self.error(f"l7 view: bad {bucket.value} entry {key!r}: {exc!r}")
            self.dirty.set()

        return changed

    async def _on_lb_change(self, key: str, old: Any, new: Any) -> None:
        self.lb_pending[key] = None
        self.lb_dirty.set()

    # --- KV `lb` -> LB maps --------------------------------------------------------------------

    async def lb_loop(self) -> None:
        """The whole bucket once its snapshot is complete (a restarted agent diffs against the
        pinned maps), then each changed Service or table alone, debounced like reconcile."""
        assert self.lb is not None
        await self.lb_mirror.synced.wait()
        await self.mirrors[Bucket.NODES].synced.wait()
        synced = False
        while True:
            self.lb_dirty.clear()
            keys, self.lb_pending = list(self.lb_pending), {}
            try:
                await self._sync_lb_nodes()
                if not synced:
                    written = await self._run(self.lb.sync, dict(self.lb_mirror.values))
                    synced = True
                else:
                    values = self.lb_mirror.values
                    written = 0
                    for key in keys:
                        written += await self._run(self.lb.update, key, values.get(key))
                before = self.ctx.status.get("lb") or {}
                if self.cfg.dev_mode:
                    await self._run(self._write_hosts, self._lb_items())
                self.ctx.status["lb"] = {
                    "synced": True, "entries": len(self.lb_mirror.values),
                    "map_writes": before.get("map_writes", 0) + written,
                    "warnings": list(self.lb.warnings)}
            except Exception as exc:  # retry with a full sync on the next change
                self.error(f"lb sync failed: {exc!r}")
                synced = False
                await asyncio.sleep(1.0)
                self.lb_dirty.set()
            await self.lb_dirty.wait()
            await asyncio.sleep(DEBOUNCE_S)

    async def _sync_lb_nodes(self) -> None:
        assert self.lb is not None
        local, remote = node_addresses(self.cfg.node, self._values(Bucket.NODES))
        if self.node_ip and self.node_ip not in local:
            local.append(self.node_ip)  # ours before KV `nodes` echoes it back
        if self.lb_nodes != (local, remote):
            await self._run(self.lb.set_node_addresses, local, remote)
            self.lb_nodes = (local, remote)

    # --- desired state -> sandboxes, maps, routes ---------------------------------------------

    async def reconcile_loop(self) -> None:
        for bucket, mirror in self.mirrors.items():
            self.ctx.status["waiting_for"] = bucket.value
            await mirror.synced.wait()
        self.ctx.status.pop("waiting_for", None)
        self.ready.set()
        # Nothing is written before every bucket's snapshot is complete: a restarted agent
        # would otherwise delete entries that are merely not yet known.
        while True:
            self.dirty.clear()
            try:
                async with self.reconcile_lock:
                    await self.reconcile()
                self.ctx.status["synced"] = True
            except Exception as exc:  # keep the agent alive; retry on the next change
                self.error(f"reconcile failed: {exc!r}")
                await asyncio.sleep(1.0)
                self.dirty.set()
            await self.dirty.wait()
            await asyncio.sleep(DEBOUNCE_S)  # debounce: coalesce a burst of KV changes

    def _values(self, bucket: Bucket) -> dict[str, Any]:
        return dict(self.mirrors[bucket].values)

    async def reconcile(self) -> None:
        assert self.dp is not None
        endpoints = self._values(Bucket.ENDPOINTS)
        policies: dict[int, Mapping[str, Any]] = {}
        for key, pol in self._values(Bucket.POLICY).items():
            with contextlib.suppress(ValueError, TypeError, KeyError):
                policies[int(pol.get("identity", key))] = pol
        self.flow_ctx = FlowContext.build(self.cfg.node, endpoints.values(),
                                          self._values(Bucket.IDENTITIES).values(),
                                          time.time_ns() - time.monotonic_ns(), self.ifnames)
        if self.cni is not None and self.cni.host is not None:
            # A real node's pods are endpoints of its maps once CNI handed them over.
            wired = self.cni.pod_keys()
            endpoints = {k: ep for k, ep in endpoints.items()
                         if ep.get("node") != self.cfg.node or k in wired}
        desired = desired_state(node=self.cfg.node, endpoints=endpoints.values(),
                                ipcache=self._values(Bucket.IPCACHE).values(), policies=policies,
                                mode=self.cfg.enforcement, audit=self.cfg.audit)
        want = local_pods(self.cfg.node, endpoints)
        # Sandboxes whose endpoint went (or changed address) go first, then the maps are
        # synced in planned order, then new sandboxes attach to already-written maps.
        for key in [k for k, pod in self.pods.items()
                    if k not in want or pod.ip != _pod_ip(want[k])]:
            await self._run(self._remove_pod, key)
        written = await self._run(self.dp.sync, desired)
        self.applied = desired
        self.syncs += 1
        for key, ep in sorted(want.items()):
            if key not in self.pods:
                try:
                    await self._run(self._add_pod, key, ep,
                                    self._lb_items() if self.cfg.dev_mode else [])
                except Exception as exc:
                    self.error(f"pod {key}: sandbox failed: {exc!r}")
        if self.node_netns is not None:
            routes = remote_routes(self.cfg.node, endpoints, self._values(Bucket.NODES))
            await self._run(self._sync_routes, routes)
        self.ctx.status.update({"endpoints": len(want), "sandboxes": len(self.pods),
                                "map_writes": written, "syncs": self.syncs})
        self.snapshot.enforcement = enforcement_counts(desired)

    def _add_pod(self, key: str, ep: Mapping[str, Any], lb_items: list[tuple[str, Any]]) -> None:
        assert self.dp is not None
        namespace, name = str(ep["namespace"]), str(ep["name"])
        pod = adopt_pod(self.cfg.state_dir, namespace, name)
        if pod is not None and (pod.record.node != self.cfg.node or pod.ip != _pod_ip(ep)):
            pod = None
        if pod is None:
            if not self.cfg.dev_mode or self.node_netns is None:
                return  # outside dev mode the runtime makes pods; we attach what we find
            pod = create_pod(node=self.cfg.node, node_netns=self.node_netns,
                             namespace=namespace, name=name, ip=_pod_ip(ep),
                             tcp_ports=_ports(ep, "TCP"), udp_ports=_ports(ep, "UDP"),
                             salt=self.cfg.cluster, state_dir=self.cfg.state_dir,
                             on_link=self._attach,
                             images=[i for i in ep.get("images") or () if isinstance(i, str)])
        else:
            self._attach(pod.ifname, pod.record.node_netns)  # replace an older agent's filters
        self.pods[key] = pod
        if self.cfg.dev_mode:
            write_pod_hosts(pod.record, hosts_file(lb_items, namespace))

    def _lb_items(self) -> list[tuple[str, Any]]:
        """KV ``lb`` as it is now (on the loop; worker-thread code gets this copy)."""
        lb = getattr(self, "lb_mirror", None)
        return list(lb.values.items()) if lb is not None else []

    def _write_hosts(self, lb_items: list[tuple[str, Any]]) -> None:
        """Dev mode: every pod's /etc/hosts follows the Services (a cluster DNS stand-in)."""
        for pod in list(self.pods.values()):
            write_pod_hosts(pod.record, hosts_file(lb_items, pod.record.namespace))

    def _remove_pod(self, key: str) -> None:
        pod = self.pods.pop(key)
        for idx in [i for i, name in self.ifnames.items() if name == pod.ifname]:
            del self.ifnames[idx]
        if self.cfg.dev_mode:
            delete_pod(pod, state_dir=self.cfg.state_dir)

    # --- CNI hand-over (cni/agent.py EndpointHost) --------------------------------------------

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await self._run(fn, *args)

    async def endpoint_ip(self, namespace: str, name: str, timeout: float) -> str | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        key = f"{namespace}.{name}"
        try:
            await asyncio.wait_for(self.ready.wait(), timeout)
        except TimeoutError:
            return None
        while True:
            self.endpoint_seen.clear()
            ep = self.mirrors[Bucket.ENDPOINTS].values.get(key)
            if ep and ep.get("node") == self.cfg.node and local_pods(self.cfg.node, {key: ep}):
                return _pod_ip(ep)
            remaining = deadline - loop.time()
            if remaining <= 0:
                return None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.endpoint_seen.wait(), remaining)

    async def enforce(self, rec: PodRecord) -> None:
        """Programs on the host veth, the sandbox recorded, then a reconcile writes its
        endpoint entry (the CNI agent counts it among its pods already)."""
        async with self.reconcile_lock:
            if rec.key in self.pods:
                await self._run(self._remove_pod, rec.key)
            await self._run(self._attach, rec.ifname, rec.node_netns or None)
            await self._run(write_record, self.cfg.state_dir, rec)
            self.pods[rec.key] = PodSandbox(rec)
            await self.reconcile()

    async def release(self, rec: PodRecord) -> None:
        async with self.reconcile_lock:
            pod = self.pods.get(rec.key)
            if pod is not None and pod.ifname == rec.ifname:
                await self._run(self._remove_pod, rec.key)
            path = self.cfg.state_dir / "pods" / f"{rec.key}.json"
            with contextlib.suppress(FileNotFoundError, ValueError):
                if json.loads(path.read_text()).get("container_id") == rec.container_id:
                    path.unlink()
            await self.reconcile()

    async def problems(self, rec: PodRecord) -> list[str]:
        assert self.dp is not None
        want = [("ingress", self.dp.fn_from.name), ("egress", self.dp.fn_to.name)]
        if self.pdp is not None:
            want.append(("ingress", self.pdp.fn.name))
        names = await self._run(tc_program_names, rec.ifname, rec.node_netns or None)
        out = [f"{rec.ifname}: no {prog.decode()} program on tc {hook}"
               for hook, prog in want if prog.decode() not in names[hook]]
        pod = self.pods.get(rec.key)
        if pod is None or pod.ifname != rec.ifname:
            out.append(f"{rec.key} is not an endpoint of this agent")
        if rec.ip not in self.applied.endpoints:
            out.append(f"no endpoint map entry for {rec.ip}")
        return out

    def _sync_routes(self, want: dict[str, str]) -> None:
        assert self.node_netns is not None
        for ip, via in want.items():
            if self.routes.get(ip) != via:
                set_remote_route(self.node_netns, ip, via)
                self.routes[ip] = via
        for ip in [ip for ip in self.routes if ip not in want]:
            set_remote_route(self.node_netns, ip, None)
            del self.routes[ip]

    # --- events, conntrack GC, metrics -------------------------------------------------------

    def _poll(self) -> tuple[list[dict[str, Any]], int]:
        """Datapath events (waiting up to 100 ms), then whatever the LB ring holds."""
        assert self.dp is not None
        events = self.dp.poll_events(100)
        if self.lb is not None:
            events += self.lb.poll_events(0)
        return events, self.dp.events_lost()

    async def events_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            events, lost = await loop.run_in_executor(self.poller, self._poll)
            assert self.publisher is not None
            for ev in events:
                self.publisher.add(event_to_flow(ev, self.flow_ctx).to_wire())
            if lost > self.lost_seen:
                self.publisher.lost(lost - self.lost_seen)
                self.lost_seen = lost
            self.ctx.status["flows"] = {"published": self.publisher.published_total,
                                        "lost": self.publisher.lost_total}

    async def gc_loop(self) -> None:
        assert self.dp is not None
        while True:
            try:
                removed = await self._run(self.dp.ct_gc)
                self.ctx.status["ct_gc_removed"] = (self.ctx.status.get("ct_gc_removed", 0)
                                                    + removed)
            except Exception as exc:
                self.error(f"conntrack GC failed: {exc!r}")
            await asyncio.sleep(self.cfg.ct_gc_interval_s)

    def _read_metrics(self) -> Snapshot:
        assert self.dp is not None
        sizes = self.cfg.sizes
        usage = {
            "cil_ipcache": (len(self.applied.ipcache), sizes.ipcache),
            "cil_lxc": (len(self.applied.endpoints), sizes.endpoints),
            "cil_policy": (len(self.applied.policy), sizes.policy),
            "cil_ct_tcp": (self.dp.ct_counts.get("cil_ct_tcp", 0), sizes.ct_tcp),
            "cil_ct_any": (self.dp.ct_counts.get("cil_ct_any", 0), sizes.ct_any),
        }
        return Snapshot(self.dp.metrics(), usage, self.snapshot.enforcement)

    async def metrics_loop(self) -> None:
        while True:
            try:
                self.snapshot = await self._run(self._read_metrics)
                self.ctx.status["maps"] = [
                    {"name": n, "max_entries": size, "entries": used,
                     "pressure": round(used / size, 4) if size else 0.0}
                    for n, (used, size) in sorted(self.snapshot.map_usage.items())]
            except Exception as exc:
                self.error(f"metrics read failed: {exc!r}")
            await asyncio.sleep(self.cfg.metrics_interval_s)

    # --- shutdown ---------------------------------------------------------------------------

    async def stop(self) -> None:
        self.proxy_stop.set()
        for proxy in (self.http_proxy, self.dns_proxy):
            if proxy is not None:
                with contextlib.suppress(Exception):
                    await proxy.stop()
        if self.learner is not None and self.cfg.teardown:
            with contextlib.suppress(Exception):  # learned FQDN identities go with the node
                await asyncio.wait_for(self.learner.release_all(), 5)
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await asyncio.to_thread(self.poller.shutdown, True)  # no poll may outlive the maps
        if self.publisher is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.publisher.stop(), 2)
        if self.cfg.teardown:
            await self._run(self._teardown)
            with contextlib.suppress(Exception):
                kv = await self.ctx.bus.kv(Bucket.NODES)
                await asyncio.wait_for(kv.delete(self.cfg.node), 2)
        else:
            for pod in self.pods.values():
                release_pod(pod)
            if self.pdp is not None:
                await self._run(self.pdp.close)
            if self.lb is not None:  # programs stay attached: services keep working
                await self._run(self.lb.close)
            if self.dp is not None:
                await self._run(self.dp.close)  # filters and pinned maps stay for the next agent
        await asyncio.to_thread(self.worker.shutdown, True)

    def _teardown(self) -> None:
        for key in list(self.pods):
            with contextlib.suppress(Exception):
                self._remove_pod(key)
        if self.pdp is not None:
            with contextlib.suppress(Exception):
                self.pdp.teardown_routing(self.node_netns)
            self.pdp.close()
        if self.lb is not None:
            with contextlib.suppress(Exception):
                self.lb.destroy()
        if self.dp is not None:
            self.dp.destroy()
        if self.cfg.dev_mode:
            with cluster_lock(self.cfg.cluster):
                remove_node(self.cfg.cluster, self.cfg.node)


async def setup(ctx: ServiceContext) -> None:
    agent = DatapathAgent(ctx, AgentConfig.from_context(ctx))
    await agent.start()


SPEC = ServiceSpec(name="datapath", setup=setup, per_node=True, needs_root=True)

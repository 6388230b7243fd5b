"""The node side of ``ciliate-cni``: REST handlers that wire a pod sandbox the runtime made.

The datapath agent mounts these on its app (``CniAgent(...).register(app)``); until it does,
any aiohttp app with the bearer-token middleware of ``ciliate.api.make_app`` can serve them
(the CNI test does). Contract (docs/k8s.md): ``POST /v1/cni/add`` and ``POST /v1/cni/del``
with ``{containerID, netns, ifName, podNamespace, podName}``, ``GET /v1/cni/check`` with the
same keys as query parameters.

Unlike dev-mode pods (``services.datapath.sandbox.create_pod`` makes its own namespace), the
kubelet's runtime owns the network namespace: ADD only adds the veth pair into it, and DEL
never removes it. The wiring follows the dev-mode layout so the datapath treats both alike:
host side ``lxc<hash>``, the pod's address as /32, a default route via the link-local gateway
with static neighbours on both ends, and a /32 route to the pod on the node.

Mounted by the datapath agent, the handlers get an :class:`EndpointHost` (the agent): the pod's
address is the one the identity service allocated for the pod k8s-sync fed it (cluster-pool
IPAM, as Cilium's agent takes it from its IPAM), and the sandbox is handed to the agent, which
attaches its programs to the host veth before the pod has an address, writes the endpoint's map
entries and records the sandbox (so a restarted agent re-adopts it). DEL hands it back (entries
removed, then the veth and its filters go); CHECK asks the agent whether it is enforced.
Without a host (the wiring-only mode the REST tests use) addresses come from the node's pod
CIDR by host-local allocation.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from aiohttp import web
from pyroute2 import IPRoute

from ciliate.api import Problem, field_problem, route
from services.datapath.cni.core.ipam import HostLocalIpam, IpamExhausted
from services.datapath.sandbox import GATEWAY_IP, PodRecord, lxc_name

NEIGH_PERMANENT = 0x80
SCOPE_LINK = 253
_REQUIRED = ("containerID", "netns", "ifName")
ENDPOINT_WAIT_S = 10.0
"""How long ADD waits for the pod's endpoint (k8s-sync -> identity -> KV) before answering
"try again later"; below the plugin's default request timeout (30 s)."""
T = TypeVar("T")


class EndpointHost(Protocol):
    """What the datapath agent lends CNI: its endpoints, its kernel worker and its programs."""

    node: str

    async def endpoint_ip(self, namespace: str, name: str, timeout: float) -> str | None:
        """The IPv4 address of the pod's endpoint on this node, waiting up to ``timeout`` for
        it to appear; None if it does not (not fed yet, or on another node)."""

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run blocking kernel work on the agent's worker thread."""

    async def enforce(self, rec: PodRecord) -> None:
        """Attach the programs to ``rec.ifname`` (the pod has no address yet), write the
        endpoint's map entries and record the sandbox."""

    async def release(self, rec: PodRecord) -> None:
        """Forget the sandbox: its endpoint entries go, its record goes."""

    async def problems(self, rec: PodRecord) -> list[str]:
        """Why the sandbox is not enforced (programs missing, no endpoint entry); [] if it is."""


@dataclass
class Attachment:
    """One ADD that succeeded: what DEL and CHECK need, persisted across agent restarts."""

    container_id: str
    netns: str
    ifname: str
    host_if: str
    ip: str
    pod_namespace: str
    pod_name: str
    host_mac: str = ""
    pod_mac: str = ""

    @property
    def pod_key(self) -> str:
        """The pod's KV `endpoints` key (``namespace.name``)."""
        return f"{self.pod_namespace}.{self.pod_name}"

    def record(self, node: str, node_netns: str | None) -> PodRecord:
        return PodRecord(self.pod_namespace, self.pod_name, node, self.netns, self.host_if,
                         self.ip, "", node_netns or "", container_id=self.container_id)


def _ipr(netns: str | None) -> IPRoute:
    return IPRoute(netns=netns) if netns else IPRoute()


TC_HOOKS = {"ingress": 0xFFFFFFF2, "egress": 0xFFFFFFF3}
"""clsact's parents (``ffff:fff2`` / ``ffff:fff3``)."""


def tc_program_names(ifname: str, netns: str | None) -> dict[str, set[str]]:
    """Names of the BPF programs in tc filters on ``ifname``'s ingress and egress hooks
    (empty sets when the link or its clsact is gone)."""
    out: dict[str, set[str]] = {hook: set() for hook in TC_HOOKS}
    with _ipr(netns) as ipr:
        found = ipr.link_lookup(ifname=ifname)
        if not found:
            return out
        for hook, parent in TC_HOOKS.items():
            try:
                filters = ipr.get_filters(index=found[0], parent=parent)
            except OSError:
                continue
            for msg in filters:
                opts = msg.get_attr("TCA_OPTIONS")
                name = opts.get_attr("TCA_BPF_NAME") if opts is not None else None
                if name:
                    out[hook].add(str(name))
    return out


class CniAgent:
    def __init__(self, pod_cidr: str, state_dir: Path, node_netns: str | None = None,
                 host: EndpointHost | None = None) -> None:
        """``node_netns`` None: the host side lives in this process's namespace (a real node).
        ``host`` None: wiring only, addresses by host-local allocation from ``pod_cidr``."""
        self.node_netns = node_netns
        self.host = host
        self.state_file = state_dir / "cni-attachments.json"
        self.attachments: dict[str, Attachment] = {}
        if self.state_file.exists():
            raw = json.loads(self.state_file.read_text())
            self.attachments = {k: Attachment(**v) for k, v in raw.items()}
        self.ipam = HostLocalIpam(pod_cidr, {} if host is not None else
                                  {k: a.ip for k, a in self.attachments.items()})
        """Wiring-only mode; with a host, addresses are identity's."""
        self._lock = asyncio.Lock()
        self._adding: dict[str, Attachment] = {}
        """ADDs in flight: their pods already count as wired (see :meth:`pod_keys`)."""

    def pod_keys(self) -> set[str]:
        """KV `endpoints` keys of the pods handed over by CNI (done or in flight): on a real
        node only these are endpoints of the node's maps (Cilium's endpoint map holds the
        endpoints that exist on the node, not every pod scheduled to it)."""
        return {a.pod_key for a in (*self.attachments.values(), *self._adding.values())}

    async def _blocking(self, fn: Callable[..., T], *args: Any) -> T:
        if self.host is not None:
            return await self.host.run(fn, *args)
        return await asyncio.to_thread(fn, *args)

    def _save(self) -> None:
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({k: asdict(a) for k, a in self.attachments.items()}))
        os.replace(tmp, self.state_file)

    # --- wiring (blocking netlink; run in a thread) --------------------------------------

    def _wire(self, att: Attachment) -> None:
        self._wire_link(att)
        self._wire_pod(att)

    def _wire_link(self, att: Attachment) -> None:
        """The veth pair, its pod end moved into the runtime's namespace; no address yet."""
        tmp_if = "tmp" + att.host_if[3:]
        with _ipr(self.node_netns) as ipr:
            for stale in ipr.link_lookup(ifname=att.host_if):
                ipr.link("del", index=stale)  # a half-made earlier ADD for this container
            ipr.link("add", ifname=att.host_if, kind="veth", peer=tmp_if)
            host_idx = ipr.link_lookup(ifname=att.host_if)[0]
            tmp_idx = ipr.link_lookup(ifname=tmp_if)[0]
            fd = os.open(att.netns, os.O_RDONLY)
            try:
                ipr.link("set", index=tmp_idx, net_ns_fd=fd)
            finally:
                os.close(fd)
            ipr.link("set", index=host_idx, state="up")
            att.host_mac = str(ipr.get_links(host_idx)[0].get_attr("IFLA_ADDRESS"))

    def _wire_pod(self, att: Attachment) -> None:
        """The pod's address, routes and neighbours, and the node's /32 route to it."""
        tmp_if = "tmp" + att.host_if[3:]
        with IPRoute(netns=att.netns) as ipr:
            idx = ipr.link_lookup(ifname=tmp_if)[0]
            ipr.link("set", index=idx, ifname=att.ifname)
            ipr.link("set", index=idx, state="up")
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
            ipr.addr("add", index=idx, address=att.ip, prefixlen=32)
            ipr.route("add", dst=f"{GATEWAY_IP}/32", oif=idx, scope=SCOPE_LINK)
            ipr.route("add", dst="0.0.0.0/0", gateway=GATEWAY_IP, oif=idx)
            ipr.neigh("add", dst=GATEWAY_IP, lladdr=att.host_mac, ifindex=idx,
                      state=NEIGH_PERMANENT)
            att.pod_mac = str(ipr.get_links(idx)[0].get_attr("IFLA_ADDRESS"))
        with _ipr(self.node_netns) as ipr:
            host_idx = ipr.link_lookup(ifname=att.host_if)[0]
            ipr.route("replace", dst=f"{att.ip}/32", oif=host_idx, scope=SCOPE_LINK)
            ipr.neigh("replace", dst=att.ip, lladdr=att.pod_mac, ifindex=host_idx,
                      state=NEIGH_PERMANENT)

    def _unwire(self, host_if: str) -> None:
        """Deleting the host end removes the pair and the /32 route with it."""
        with _ipr(self.node_netns) as ipr:
            for idx in ipr.link_lookup(ifname=host_if):
                ipr.link("del", index=idx)

    def _problems(self, att: Attachment) -> list[str]:
        problems = []
        with _ipr(self.node_netns) as ipr:
            if not ipr.link_lookup(ifname=att.host_if):
                problems.append(f"host interface {att.host_if} is missing")
        try:
            with IPRoute(netns=att.netns) as ipr:
                found = ipr.link_lookup(ifname=att.ifname)
                addrs = {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=found[0])
                         } if found else set()
        except OSError as exc:
            return [*problems, f"netns {att.netns}: {exc}"]
        if not found:
            problems.append(f"{att.ifname} is missing in {att.netns}")
        elif att.ip not in addrs:
            problems.append(f"{att.ifname} lacks {att.ip}")
        return problems

    # --- REST ----------------------------------------------------------------------------

    @staticmethod
    def _args(data: Any, need_netns: bool = True) -> dict[str, str]:
        if not isinstance(data, dict):
            raise field_problem(400, "", "expected a JSON object")
        for key in _REQUIRED:
            if key == "netns" and not need_netns:
                continue
            if not isinstance(data.get(key), str) or not data.get(key):
                raise field_problem(422, key, "required (a non-empty string)")
        return {k: str(v) for k, v in data.items() if isinstance(v, str)}

    @staticmethod
    def _result(att: Attachment) -> dict[str, Any]:
        return {
            "interfaces": [{"name": att.host_if, "mac": att.host_mac},
                           {"name": att.ifname, "mac": att.pod_mac, "sandbox": att.netns}],
            "ips": [{"address": f"{att.ip}/32", "gateway": GATEWAY_IP,
                     "interface": att.ifname}],
            "routes": [{"dst": "0.0.0.0/0", "gw": GATEWAY_IP}],
        }

    async def add(self, request: web.Request) -> web.Response:
        args = self._args(await request.json())
        if not await asyncio.to_thread(os.path.exists, args["netns"]):
            raise field_problem(404, "netns", f"{args['netns']} does not exist")
        cid = args["containerID"]
        namespace, name = args.get("podNamespace", ""), args.get("podName", "")
        current = self.attachments.get(cid)
        if current is not None and not await self._all_problems(current):
            return web.json_response(self._result(current))
        ip = ""
        if self.host is not None:
            if not namespace or not name:
                raise field_problem(422, "podName", "podNamespace and podName are required")
            # Outside the lock: the wait can be long and other pods' ADDs need not queue.
            found = await self.host.endpoint_ip(namespace, name, ENDPOINT_WAIT_S)
            if found is None:
                raise Problem(503, f"pod {namespace}/{name} is not an endpoint of node "
                                   f"{self.host.node} yet (k8s-sync feeds it to identity, "
                                   "which allocates its address); try again")
            ip = found
        async with self._lock:
            current = self.attachments.get(cid)
            if current is not None:
                if not await self._all_problems(current):
                    return web.json_response(self._result(current))
                await self._remove(current)  # broken wiring: start over
            for other in [a for a in self.attachments.values()
                          if a.pod_key == f"{namespace}.{name}" and self.host is not None]:
                await self._remove(other)  # the pod's earlier sandbox, never DELeted
            if self.host is None:
                try:
                    ip = self.ipam.allocate(cid)
                except IpamExhausted as exc:
                    raise field_problem(503, "containerID", str(exc)) from None
            att = Attachment(cid, args["netns"], args["ifName"], lxc_name("cni", cid), ip,
                             namespace, name)
            self._adding[cid] = att
            try:
                await self._blocking(self._wire_link, att)
                if self.host is not None:
                    await self.host.enforce(att.record(self.host.node, self.node_netns))
                await self._blocking(self._wire_pod, att)
            except Exception as exc:
                if self.host is not None:
                    with contextlib.suppress(Exception):
                        await self.host.release(att.record(self.host.node, self.node_netns))
                with contextlib.suppress(Exception):
                    await self._blocking(self._unwire, att.host_if)
                self.ipam.release(cid)
                raise field_problem(500, "netns", f"wiring failed: {exc}") from None
            finally:
                self._adding.pop(cid, None)
            self.attachments[cid] = att
            self._save()
        return web.json_response(self._result(att))

    async def _remove(self, att: Attachment) -> None:
        """Hand the sandbox back (its entries go first), then unwire it; caller holds the lock."""
        self.attachments.pop(att.container_id, None)
        if self.host is not None:
            await self.host.release(att.record(self.host.node, self.node_netns))
        await self._blocking(self._unwire, att.host_if)
        self.ipam.release(att.container_id)
        self._save()

    async def _all_problems(self, att: Attachment) -> list[str]:
        problems = await self._blocking(self._problems, att)
        if self.host is not None and not problems:
            problems += await self.host.problems(att.record(self.host.node, self.node_netns))
        return problems

    async def delete(self, request: web.Request) -> web.Response:
        """Idempotent, as the spec requires: an unknown container is already deleted."""
        args = self._args(await request.json(), need_netns=False)
        cid = args["containerID"]
        async with self._lock:
            att = self.attachments.get(cid)
            if att is not None:
                await self._remove(att)
            else:
                self.ipam.release(cid)
        return web.json_response({"deleted": att is not None})

    async def check(self, request: web.Request) -> web.Response:
        args = self._args(dict(request.query))
        att = self.attachments.get(args["containerID"])
        if att is None:
            raise field_problem(404, "containerID", f"no attachment for {args['containerID']}")
        problems = await self._all_problems(att)
        if problems:
            raise field_problem(409, "netns", "; ".join(problems))
        return web.json_response(self._result(att))

    def register(self, app: web.Application) -> None:
        route(app, "POST", "/v1/cni/add", self.add, summary="wire a pod sandbox (CNI ADD)")
        route(app, "POST", "/v1/cni/del", self.delete, summary="unwire a pod sandbox (CNI DEL)")
        route(app, "GET", "/v1/cni/check", self.check, summary="verify a pod's wiring (CNI CHECK)",
              query=("containerID", "netns", "ifName"))

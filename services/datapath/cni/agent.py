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
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from pyroute2 import IPRoute

from ciliate.api import field_problem, route
from services.datapath.cni.core.ipam import HostLocalIpam, IpamExhausted
from services.datapath.sandbox import GATEWAY_IP, lxc_name

NEIGH_PERMANENT = 0x80
SCOPE_LINK = 253
_REQUIRED = ("containerID", "netns", "ifName")


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


def _ipr(netns: str | None) -> IPRoute:
    return IPRoute(netns=netns) if netns else IPRoute()


class CniAgent:
    def __init__(self, pod_cidr: str, state_dir: Path, node_netns: str | None = None) -> None:
        """``node_netns`` None: the host side lives in this process's namespace (a real node)."""
        self.node_netns = node_netns
        self.state_file = state_dir / "cni-attachments.json"
        self.attachments: dict[str, Attachment] = {}
        if self.state_file.exists():
            raw = json.loads(self.state_file.read_text())
            self.attachments = {k: Attachment(**v) for k, v in raw.items()}
        self.ipam = HostLocalIpam(pod_cidr, {k: a.ip for k, a in self.attachments.items()})
        self._lock = asyncio.Lock()

    def _save(self) -> None:
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({k: asdict(a) for k, a in self.attachments.items()}))
        os.replace(tmp, self.state_file)

    # --- wiring (blocking netlink; run in a thread) --------------------------------------

    def _wire(self, att: Attachment) -> None:
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
        async with self._lock:
            current = self.attachments.get(cid)
            if current is not None and not await asyncio.to_thread(self._problems, current):
                return web.json_response(self._result(current))
            try:
                ip = self.ipam.allocate(cid)
            except IpamExhausted as exc:
                raise field_problem(503, "containerID", str(exc)) from None
            att = Attachment(cid, args["netns"], args["ifName"], lxc_name("cni", cid), ip,
                             args.get("podNamespace", ""), args.get("podName", ""))
            try:
                await asyncio.to_thread(self._wire, att)
            except Exception as exc:
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(self._unwire, att.host_if)
                self.ipam.release(cid)
                raise field_problem(500, "netns", f"wiring failed: {exc}") from None
            self.attachments[cid] = att
            self._save()
        return web.json_response(self._result(att))

    async def delete(self, request: web.Request) -> web.Response:
        """Idempotent, as the spec requires: an unknown container is already deleted."""
        args = self._args(await request.json(), need_netns=False)
        cid = args["containerID"]
        async with self._lock:
            att = self.attachments.pop(cid, None)
            if att is not None:
                await asyncio.to_thread(self._unwire, att.host_if)
            self.ipam.release(cid)
            self._save()
        return web.json_response({"deleted": att is not None})

    async def check(self, request: web.Request) -> web.Response:
        args = self._args(dict(request.query))
        att = self.attachments.get(args["containerID"])
        if att is None:
            raise field_problem(404, "containerID", f"no attachment for {args['containerID']}")
        problems = await asyncio.to_thread(self._problems, att)
        if problems:
            raise field_problem(409, "netns", "; ".join(problems))
        return web.json_response(self._result(att))

    def register(self, app: web.Application) -> None:
        route(app, "POST", "/v1/cni/add", self.add, summary="wire a pod sandbox (CNI ADD)")
        route(app, "POST", "/v1/cni/del", self.delete, summary="unwire a pod sandbox (CNI DEL)")
        route(app, "GET", "/v1/cni/check", self.check, summary="verify a pod's wiring (CNI CHECK)",
              query=("containerID", "netns", "ifName"))

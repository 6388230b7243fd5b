"""L7 records as Hubble flows (Type L7, event type 129 access log), in the shared wire form.

A request flow goes client -> server; the response flow is the reply (server -> client,
``is_reply``) carrying the status code and the latency since the request. A denied request
is a DROPPED request flow plus the proxy's own 403 response flow, as Hubble shows Envoy's.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from ciliate.flows.model import DNS, HTTP, Endpoint, Flow, Layer7, Wire
from ciliate.flows.tables import (
    FlowType,
    L7FlowType,
    MessageType,
    TrafficDirection,
    Verdict,
)
from services.datapath.proxy.core.policy import PolicyView

DIRECTIONS = {"ingress": TrafficDirection.INGRESS, "egress": TrafficDirection.EGRESS}


@dataclass(frozen=True)
class Conn:
    """One proxied connection (or DNS exchange) as the flows describe it."""

    src_ip: str
    src_port: int
    dst_ip: str
    dst_port: int
    proto: int
    direction: str  # the policy direction that redirected it
    proxy_port: int


def _endpoint(view: PolicyView, ip: str) -> Endpoint:
    ep = view.endpoints_by_ip.get(ip)
    if ep is not None:
        return Endpoint(ep.endpoint_id, ep.identity, ep.namespace, list(ep.labels), ep.name)
    ident = view.identity_of(ip)
    return Endpoint(identity=ident, labels=list(view.labels_of(ident)))


def _base(view: PolicyView, conn: Conn, now_ns: int, verdict: Verdict, reply: bool) -> Flow:
    src, dst = _endpoint(view, conn.src_ip), _endpoint(view, conn.dst_ip)
    sip, sp, dip, dp = conn.src_ip, conn.src_port, conn.dst_ip, conn.dst_port
    if reply:
        src, dst, sip, sp, dip, dp = dst, src, dip, dp, sip, sp
    return Flow(
        time_ns=now_ns, uuid=str(uuid.uuid4()), node_name=view.node, verdict=verdict,
        event_type=MessageType.ACCESS_LOG, type=FlowType.L7,
        traffic_direction=DIRECTIONS.get(
            conn.direction, TrafficDirection.TRAFFIC_DIRECTION_UNKNOWN),
        is_reply=reply, ip_version=6 if ":" in sip else 4, source_ip=sip, destination_ip=dip,
        protocol=conn.proto, source_port=sp, destination_port=dp, source=src, destination=dst,
        proxy_port=conn.proxy_port,
    )


def http_flow(
    view: PolicyView, conn: Conn, *, now_ns: int, method: str, url: str, protocol: str,
    headers: list[tuple[str, str]], code: int = 0, latency_ns: int = 0, allowed: bool = True,
    response: bool = False,
) -> Wire:
    verdict = Verdict.FORWARDED if allowed else Verdict.DROPPED
    f = _base(view, conn, now_ns, verdict, response)
    ty = L7FlowType.RESPONSE if response else L7FlowType.REQUEST
    f.l7 = Layer7(int(ty), latency_ns, http=HTTP(code, method, url, protocol, list(headers)))
    kind = "response" if response else "request"
    tail = f" => {code}" if response else ""
    f.summary = f"{protocol} {kind} {method} {url}{tail}"
    return f.to_wire()


def dns_flow(
    view: PolicyView, conn: Conn, *, now_ns: int, query: str, qtypes: list[str],
    rcode: int = 0, ips: list[str] | None = None, ttl: int = 0, cnames: list[str] | None = None,
    rrtypes: list[str] | None = None, latency_ns: int = 0, allowed: bool = True,
    response: bool = False,
) -> Wire:
    verdict = Verdict.FORWARDED if allowed else Verdict.DROPPED
    f = _base(view, conn, now_ns, verdict, response)
    ty = L7FlowType.RESPONSE if response else L7FlowType.REQUEST
    f.l7 = Layer7(int(ty), latency_ns, dns=DNS(
        query=query, ips=list(ips or []), ttl=ttl, cnames=list(cnames or []),
        observation_source="proxy", rcode=rcode, qtypes=list(qtypes), rrtypes=list(rrtypes or []),
    ))
    types = ",".join(qtypes)
    if response:
        f.summary = f"DNS Answer \"{','.join(ips or [])}\" TTL: {ttl} (Proxy {query} {types})"
    else:
        f.summary = f"DNS Query {query} {types}"
    return f.to_wire()

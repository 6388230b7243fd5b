"""Decoded ring-buffer events -> Hubble flow records (``ciliate.flows`` wire form), enriched with
what the KV buckets say about each side: endpoint ID, namespace, pod name, labels.

Pure: the agent passes in its current view of the ``endpoints`` and ``identities`` buckets.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ciliate.flows.model import (
    Endpoint,
    Flow,
    LostEvent,
    Wire,
    drop_flow_defaults,
    trace_flow_defaults,
)
from ciliate.flows.tables import (
    FlowType,
    IPVersion,
    LostEventSource,
    MessageType,
    MonitorTracePoint,
    PolicyMatchType,
    TraceReason,
    TrafficDirection,
    Verdict,
)

PROTO_NUMBERS = {"ICMPv4": 1, "TCP": 6, "UDP": 17, "SCTP": 132}
TCP_FLAG_BITS = {"FIN": 0x01, "SYN": 0x02, "RST": 0x04, "PSH": 0x08, "ACK": 0x10, "URG": 0x20,
                 "ECE": 0x40, "CWR": 0x80, "NS": 0x100}


@dataclass(frozen=True)
class EndpointInfo:
    id: int
    identity: int
    namespace: str
    pod_name: str
    labels: tuple[str, ...]


@dataclass
class FlowContext:
    """The agent's view of the cluster used to enrich flows; rebuilt when the KV changes."""

    node: str
    by_ip: dict[str, EndpointInfo] = field(default_factory=dict)
    identity_labels: dict[int, tuple[str, ...]] = field(default_factory=dict)
    clock_offset_ns: int = 0
    """Wall clock minus CLOCK_MONOTONIC (what bpf_ktime_get_ns counts)."""
    ifnames: Mapping[int, str] = field(default_factory=dict)
    """Host-side interface names by index (the agent records them as it attaches)."""

    @classmethod
    def build(cls, node: str, endpoints: Iterable[Mapping[str, Any]],
              identities: Iterable[Mapping[str, Any]], clock_offset_ns: int = 0,
              ifnames: Mapping[int, str] | None = None) -> FlowContext:
        labels = {int(i["id"]): tuple(i.get("labels", ())) for i in identities if "id" in i}
        by_ip: dict[str, EndpointInfo] = {}
        for ep in endpoints:
            ident = int(ep.get("identity", 0))
            info = EndpointInfo(int(ep.get("id", 0)), ident, str(ep.get("namespace", "")),
                                str(ep.get("name", "")),
                                tuple(ep.get("labels") or labels.get(ident, ())))
            for ip in ep.get("ips", ()):
                by_ip[str(ip)] = info
        return cls(node, by_ip, labels, clock_offset_ns, ifnames if ifnames is not None else {})

    def endpoint(self, ip: str, identity: int) -> Endpoint:
        info = self.by_ip.get(ip)
        if info is not None and (identity == 0 or info.identity == identity):
            return Endpoint(id=info.id, identity=info.identity, namespace=info.namespace,
                            labels=list(info.labels), pod_name=info.pod_name)
        return Endpoint(identity=identity, labels=list(self.identity_labels.get(identity, ())))


def _enum(enum: Any, value: Any, default: int = 0) -> int:
    if isinstance(value, int):
        return value
    try:
        return int(enum[value])
    except KeyError:
        return default


def event_to_flow(ev: Mapping[str, Any], ctx: FlowContext) -> Flow:
    """One decoded event (``core.events.decode_event``) -> a Hubble flow."""
    etype = _enum(MessageType, ev["type"])
    direction = _enum(TrafficDirection, ev["traffic_direction"])
    proto_name = str(ev["proto"])
    proto = PROTO_NUMBERS.get(proto_name, int(proto_name) if proto_name.isdigit() else 0)
    f = Flow(
        time_ns=int(ev["ts_ns"]) + ctx.clock_offset_ns,
        uuid=str(uuid.uuid4()),
        node_name=ctx.node,
        verdict=_enum(Verdict, ev["verdict"]),
        drop_reason=int(ev.get("drop_reason", 0)),
        event_type=etype,
        type=FlowType.L3_L4,
        traffic_direction=direction,
        trace_reason=_enum(TraceReason, ev.get("trace_reason", 0)),
        policy_match_type=_enum(PolicyMatchType, ev.get("policy_match_type", 0)),
        ip_version=IPVersion.IPv4,
        source_ip=str(ev["src_ip"]),
        destination_ip=str(ev["dst_ip"]),
        protocol=proto,
        source_port=int(ev.get("src_port", 0)),
        destination_port=int(ev.get("dst_port", 0)),
        tcp_flags=sum(TCP_FLAG_BITS.get(n, 0) for n in ev.get("tcp_flags", ())),
    )
    # Hubble: a trace is a reply when conntrack says so (older producers only send is_reply).
    f.is_reply = (f.trace_reason == TraceReason.REPLY if f.trace_reason
                  else bool(ev.get("is_reply", False)))
    if proto == 1:  # ICMP has no ports; the fields hold type/code when the C fills them
        f.source_port = f.destination_port = 0
    ifindex = int(ev.get("ifindex", 0))
    if ifindex:  # ``ciliate monitor`` prints "ifindex lxc..."
        f.interface = (ifindex, ctx.ifnames.get(ifindex, ""))
    f.source = ctx.endpoint(f.source_ip, int(ev.get("src_identity", 0)))
    f.destination = ctx.endpoint(f.destination_ip, int(ev.get("dst_identity", 0)))
    if etype == MessageType.DROP:
        drop_flow_defaults(f, f.drop_reason)
    elif etype == MessageType.TRACE:
        # to_container sees packets entering the pod, from_container packets leaving it.
        trace_flow_defaults(f, MonitorTracePoint.TO_LXC if direction == TrafficDirection.INGRESS
                            else MonitorTracePoint.FROM_LXC)
    return f


def lost_record(count: int, node: str, time_ns: int) -> Wire:
    """A LostEvent for events the kernel ring buffer refused."""
    return LostEvent(source=LostEventSource.PERF_EVENT_RING_BUFFER, num_events_lost=count,
                     time_ns=time_ns, node_name=node).to_wire()

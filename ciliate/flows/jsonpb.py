"""Hubble's JSON: flow.Flow and observer.GetFlowsResponse as ``hubble observe -o json`` prints them.

Hubble marshals with protojson and proto field names: default values are left out, enums are
their names, 64-bit integers are strings, timestamps are RFC 3339 in UTC, BoolValue wrappers
are plain booleans.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from ciliate.flows.model import Endpoint, Flow, LostEvent, Wire, is_lost, l4_protocol_name
from ciliate.flows.tables import (
    ICMPV4_TYPE_NAMES,
    ICMPV6_TYPE_NAMES,
    TCP_FLAGS_PROTO_ORDER,
    FlowType,
    IPProto,
    IPVersion,
    L7FlowType,
    LostEventSource,
    TraceObservationPoint,
    TraceReason,
    TrafficDirection,
    Verdict,
    drop_reason_name,
    tcp_flag_names,
)

Json = dict[str, Any]


def rfc3339(time_ns: int) -> str:
    """protojson's Timestamp form: ``2023-11-23T10:00:00.123Z`` (0, 3, 6 or 9 fraction digits)."""
    seconds, nanos = divmod(time_ns, 1_000_000_000)
    base = datetime.fromtimestamp(seconds, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S")
    if nanos == 0:
        return base + "Z"
    if nanos % 1_000_000 == 0:
        return f"{base}.{nanos // 1_000_000:03d}Z"
    if nanos % 1_000 == 0:
        return f"{base}.{nanos // 1_000:06d}Z"
    return f"{base}.{nanos:09d}Z"


def parse_rfc3339(text: str) -> int:
    """Nanoseconds since the epoch from an RFC 3339 time (the inverse of ``rfc3339``)."""
    text = text.strip()
    if text.endswith("Z"):
        text = text[:-1] + "+00:00"
    frac_ns = 0
    if "." in text:
        head, rest = text.split(".", 1)
        digits = ""
        while rest and rest[0].isdigit():
            digits, rest = digits + rest[0], rest[1:]
        frac_ns = int((digits + "000000000")[:9])
        text = head + rest
    stamp = datetime.fromisoformat(text)
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=UTC)
    return int(stamp.timestamp()) * 1_000_000_000 + frac_ns


def summary(f: Flow) -> str:
    """Hubble's Summary text, derived from the L4/L7 layer when the producer left it empty."""
    if f.summary:
        return f.summary
    if f.l7 is not None:
        if f.l7.http is not None:
            h = f.l7.http
            if f.l7.type == L7FlowType.RESPONSE:
                return (f"{h.protocol} {h.code} {f.l7.latency_ns // 1_000_000}ms "
                        f"({h.method} {h.url})")
            return f"{h.protocol} {h.method} {h.url}"
        if f.l7.dns is not None:
            kind = "response" if f.l7.type == L7FlowType.RESPONSE else "query"
            return f"DNS {kind} {f.l7.dns.query}"
        return ""
    if f.protocol == IPProto.TCP:
        return "TCP Flags: " + ", ".join(tcp_flag_names(f.tcp_flags))
    if f.protocol == IPProto.UDP:
        return "UDP"
    if f.protocol == IPProto.SCTP:
        return "SCTP"
    if f.protocol in (IPProto.ICMP, IPProto.ICMPV6):
        names = ICMPV4_TYPE_NAMES if f.protocol == IPProto.ICMP else ICMPV6_TYPE_NAMES
        label = "ICMPv4" if f.protocol == IPProto.ICMP else "ICMPv6"
        name = names.get(f.icmp_type, str(f.icmp_type))
        if f.icmp_code:
            name += f"({f.icmp_code})"
        return f"{label} {name}"
    return ""


def _endpoint(ep: Endpoint) -> Json:
    out: Json = {}
    if ep.id:
        out["ID"] = ep.id
    if ep.identity:
        out["identity"] = ep.identity
    if ep.namespace:
        out["namespace"] = ep.namespace
    if ep.labels:
        out["labels"] = list(ep.labels)
    if ep.pod_name:
        out["pod_name"] = ep.pod_name
    if ep.workloads:
        out["workloads"] = [{"name": w.name, "kind": w.kind} for w in ep.workloads]
    return out


def _l4(f: Flow) -> Json | None:
    name = l4_protocol_name(f.protocol)
    if not name:
        return None
    body: Json = {}
    if f.protocol in (IPProto.TCP, IPProto.UDP, IPProto.SCTP):
        if f.source_port:
            body["source_port"] = f.source_port
        if f.destination_port:
            body["destination_port"] = f.destination_port
        if f.protocol == IPProto.TCP and f.tcp_flags:
            body["flags"] = {n: True for n in tcp_flag_names(f.tcp_flags, TCP_FLAGS_PROTO_ORDER)}
    else:
        if f.icmp_type:
            body["type"] = f.icmp_type
        if f.icmp_code:
            body["code"] = f.icmp_code
    return {name: body}


def _enum_name(enum: type[Any], value: int) -> str | int:
    try:
        return str(enum(value).name)
    except ValueError:
        return value


def flow_json(f: Flow) -> Json:
    """flow.Flow as Hubble's JSON (proto field names, defaults omitted)."""
    out: Json = {}
    if f.time_ns:
        out["time"] = rfc3339(f.time_ns)
    if f.uuid:
        out["uuid"] = f.uuid
    if f.verdict:
        out["verdict"] = _enum_name(Verdict, f.verdict)
    if f.drop_reason:
        out["drop_reason"] = f.drop_reason
    if f.source_mac or f.destination_mac:
        out["ethernet"] = {k: v for k, v in (("source", f.source_mac),
                                             ("destination", f.destination_mac)) if v}
    if f.ip_version or f.source_ip or f.destination_ip:
        ip: Json = {}
        if f.source_ip:
            ip["source"] = f.source_ip
        if f.destination_ip:
            ip["destination"] = f.destination_ip
        if f.ip_version:
            ip["ipVersion"] = _enum_name(IPVersion, f.ip_version)
        out["IP"] = ip
    l4 = _l4(f)
    if l4 is not None:
        out["l4"] = l4
    out["source"] = _endpoint(f.source)
    out["destination"] = _endpoint(f.destination)
    if f.type:
        out["Type"] = _enum_name(FlowType, f.type)
    if f.node_name:
        out["node_name"] = f.node_name
    if f.source_names:
        out["source_names"] = list(f.source_names)
    if f.destination_names:
        out["destination_names"] = list(f.destination_names)
    if f.l7 is not None:
        out["l7"] = _l7_json(f)
    if f.event_type or f.event_sub_type:
        et: Json = {}
        if f.event_type:
            et["type"] = int(f.event_type)
        if f.event_sub_type:
            et["sub_type"] = f.event_sub_type
        out["event_type"] = et
    if f.source_service:
        out["source_service"] = {"name": f.source_service.name,
                                 "namespace": f.source_service.namespace}
    if f.destination_service:
        out["destination_service"] = {"name": f.destination_service.name,
                                      "namespace": f.destination_service.namespace}
    if f.traffic_direction:
        out["traffic_direction"] = _enum_name(TrafficDirection, f.traffic_direction)
    if f.policy_match_type:
        out["policy_match_type"] = f.policy_match_type
    if f.trace_observation_point:
        out["trace_observation_point"] = _enum_name(TraceObservationPoint,
                                                    f.trace_observation_point)
    if f.trace_reason:
        out["trace_reason"] = _enum_name(TraceReason, f.trace_reason)
    if f.drop_reason:
        out["drop_reason_desc"] = drop_reason_name(f.drop_reason)
    if f.is_reply is not None:
        out["is_reply"] = f.is_reply
    if f.interface is not None:
        iface: Json = {}
        if f.interface[0]:
            iface["index"] = f.interface[0]
        if f.interface[1]:
            iface["name"] = f.interface[1]
        out["interface"] = iface
    if f.proxy_port:
        out["proxy_port"] = f.proxy_port
    text = summary(f)
    if text:
        out["Summary"] = text
    return out


def _l7_json(f: Flow) -> Json:
    assert f.l7 is not None
    l7 = f.l7
    out: Json = {}
    if l7.type:
        out["type"] = _enum_name(L7FlowType, l7.type)
    if l7.latency_ns:
        out["latency_ns"] = str(l7.latency_ns)
    if l7.http is not None:
        h = l7.http
        http: Json = {}
        if h.code:
            http["code"] = h.code
        if h.method:
            http["method"] = h.method
        if h.url:
            http["url"] = h.url
        if h.protocol:
            http["protocol"] = h.protocol
        if h.headers:
            http["headers"] = [{"key": k, "value": v} for k, v in h.headers]
        out["http"] = http
    if l7.dns is not None:
        d = l7.dns
        dns: Json = {k: v for k, v in (
            ("query", d.query), ("ips", d.ips), ("ttl", d.ttl), ("cnames", d.cnames),
            ("observation_source", d.observation_source), ("rcode", d.rcode),
            ("qtypes", d.qtypes), ("rrtypes", d.rrtypes)) if v}
        out["dns"] = dns
    return out


def lost_event_json(e: LostEvent) -> Json:
    out: Json = {"source": _enum_name(LostEventSource, e.source)}
    if e.num_events_lost:
        out["num_events_lost"] = str(e.num_events_lost)
    if e.cpu is not None:
        out["cpu"] = e.cpu
    return out


def get_flows_response(w: Wire) -> Json:
    """observer.GetFlowsResponse for a wire record (a flow or a lost event)."""
    if is_lost(w):
        lost = LostEvent.from_wire(w)
        out: Json = {"lost_events": lost_event_json(lost)}
        node, time_ns = lost.node_name, lost.time_ns
    else:
        f = Flow.from_wire(w)
        out = {"flow": flow_json(f)}
        node, time_ns = f.node_name, f.time_ns
    if node:
        out["node_name"] = node
    if time_ns:
        out["time"] = rfc3339(time_ns)
    return out

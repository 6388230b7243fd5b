"""The flow record: a typed form for producers and printers, a flat msgpack-friendly wire form.

Flows are high-volume, so the wire form is a flat dict with short keys (``WIRE_DOC`` lists
them). The events service filters on those keys directly, without building a ``Flow``;
``Flow.from_wire`` is only paid for flows that are printed or exported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ciliate.flows.tables import (
    TRACE_POINT_TO_OBSERVATION,
    FlowType,
    IPProto,
    LostEventSource,
    MessageType,
    TraceObservationPoint,
    TrafficDirection,
    Verdict,
)

Wire = dict[str, Any]
"""A flow or lost-event record as it travels on NATS (msgpack) and sits in the ring."""

WIRE_DOC: dict[str, str] = {
    "t": "int: time, nanoseconds since the Unix epoch",
    "u": "str: uuid",
    "n": "str: node name",
    "v": "int: Verdict",
    "dr": "int: drop reason code (DropReason), 0 when not dropped",
    "et": "int: event type (MessageType)",
    "es": "int: event sub-type (trace point, drop reason...)",
    "ty": "int: FlowType",
    "td": "int: TrafficDirection",
    "rp": "bool: is_reply; absent when unknown",
    "op": "int: TraceObservationPoint (proto numbering)",
    "tr": "int: TraceReason (new, established, reply...); 0/absent when unknown",
    "pm": "int: policy_match_type",
    "ipv": "int: IPVersion; 0/absent when the flow has no IP layer",
    "sip": "str: source IP", "dip": "str: destination IP",
    "sm": "str: source MAC", "dm": "str: destination MAC",
    "p": "int: IP protocol number (6 TCP, 17 UDP, 1 ICMP, 58 ICMPv6, 132 SCTP)",
    "sp": "int: source port", "dp": "int: destination port",
    "tf": "int: TCP flag bits (TCPFlag)",
    "it": "int: ICMP type", "ic": "int: ICMP code",
    "sid": "int: source endpoint ID", "si": "int: source identity",
    "sn": "str: source namespace", "spn": "str: source pod name",
    "sl": "list[str]: source labels (k8s:app=x)", "sw": "list[[name, kind]]: source workloads",
    "did": "int", "di": "int", "dn": "str", "dpn": "str", "dl": "list[str]", "dw": "list",
    "ssv": "[namespace, name]: source service", "dsv": "[namespace, name]: destination service",
    "snm": "list[str]: source names (DNS)", "dnm": "list[str]: destination names",
    "pp": "int: proxy port", "if": "[index, name]: interface",
    "l7": "dict: {ty: L7FlowType, lat: ns, http: {...} | dns: {...}}",
    "sum": "str: summary; derived from l4 when absent",
    "k": "str: record kind; absent for flows, 'lost' for a LostEvent",
}

LOST_KIND = "lost"


@dataclass(slots=True)
class Workload:
    name: str
    kind: str


@dataclass(slots=True)
class Endpoint:
    """flow.Endpoint: who sent or received the packet."""

    id: int = 0
    identity: int = 0
    namespace: str = ""
    labels: list[str] = field(default_factory=list)
    pod_name: str = ""
    workloads: list[Workload] = field(default_factory=list)


@dataclass(slots=True)
class HTTP:
    code: int = 0
    method: str = ""
    url: str = ""
    protocol: str = ""
    headers: list[tuple[str, str]] = field(default_factory=list)


@dataclass(slots=True)
class DNS:
    query: str = ""
    ips: list[str] = field(default_factory=list)
    ttl: int = 0
    cnames: list[str] = field(default_factory=list)
    observation_source: str = ""
    rcode: int = 0
    qtypes: list[str] = field(default_factory=list)
    rrtypes: list[str] = field(default_factory=list)


@dataclass(slots=True)
class Layer7:
    type: int = 0
    latency_ns: int = 0
    http: HTTP | None = None
    dns: DNS | None = None


@dataclass(slots=True)
class Service:
    namespace: str
    name: str


@dataclass(slots=True)
class Flow:
    """One observed packet or L7 record, the fields of Hubble's flow.Flow that Ciliate fills."""

    time_ns: int = 0
    uuid: str = ""
    node_name: str = ""
    verdict: int = Verdict.VERDICT_UNKNOWN
    drop_reason: int = 0
    event_type: int = MessageType.UNSPEC
    event_sub_type: int = 0
    type: int = FlowType.L3_L4
    traffic_direction: int = TrafficDirection.TRAFFIC_DIRECTION_UNKNOWN
    is_reply: bool | None = None
    trace_observation_point: int = TraceObservationPoint.UNKNOWN_POINT
    trace_reason: int = 0
    policy_match_type: int = 0
    ip_version: int = 0
    source_ip: str = ""
    destination_ip: str = ""
    source_mac: str = ""
    destination_mac: str = ""
    protocol: int = 0
    source_port: int = 0
    destination_port: int = 0
    tcp_flags: int = 0
    icmp_type: int = 0
    icmp_code: int = 0
    source: Endpoint = field(default_factory=Endpoint)
    destination: Endpoint = field(default_factory=Endpoint)
    source_service: Service | None = None
    destination_service: Service | None = None
    source_names: list[str] = field(default_factory=list)
    destination_names: list[str] = field(default_factory=list)
    proxy_port: int = 0
    interface: tuple[int, str] | None = None
    l7: Layer7 | None = None
    summary: str = ""

    def to_wire(self) -> Wire:
        return encode_flow(self)

    @classmethod
    def from_wire(cls, w: Wire) -> Flow:
        return decode_flow(w)


@dataclass(slots=True)
class LostEvent:
    """observer.LostEvent: events lost at ``source`` (a ring overrun, a full queue), counted."""

    source: int = LostEventSource.UNKNOWN_LOST_EVENT_SOURCE
    num_events_lost: int = 0
    cpu: int | None = None
    time_ns: int = 0
    node_name: str = ""

    def to_wire(self) -> Wire:
        w: Wire = {"k": LOST_KIND, "ls": int(self.source), "ln": self.num_events_lost,
                   "t": self.time_ns, "n": self.node_name}
        if self.cpu is not None:
            w["lc"] = self.cpu
        return w

    @classmethod
    def from_wire(cls, w: Wire) -> LostEvent:
        return cls(source=w.get("ls", 0), num_events_lost=w.get("ln", 0), cpu=w.get("lc"),
                   time_ns=w.get("t", 0), node_name=w.get("n", ""))


def is_lost(w: Wire) -> bool:
    return w.get("k") == LOST_KIND


def _put_endpoint(w: Wire, prefix: str, ep: Endpoint) -> None:
    if ep.id:
        w[prefix + "id"] = ep.id
    if ep.identity:
        w[prefix + "i"] = ep.identity
    if ep.namespace:
        w[prefix + "n"] = ep.namespace
    if ep.pod_name:
        w[prefix + "pn"] = ep.pod_name
    if ep.labels:
        w[prefix + "l"] = list(ep.labels)
    if ep.workloads:
        w[prefix + "w"] = [[wl.name, wl.kind] for wl in ep.workloads]


def _get_endpoint(w: Wire, prefix: str) -> Endpoint:
    return Endpoint(
        id=w.get(prefix + "id", 0),
        identity=w.get(prefix + "i", 0),
        namespace=w.get(prefix + "n", ""),
        labels=list(w.get(prefix + "l", ())),
        pod_name=w.get(prefix + "pn", ""),
        workloads=[Workload(n, k) for n, k in w.get(prefix + "w", ())],
    )


_SCALARS: tuple[tuple[str, str], ...] = (
    ("u", "uuid"), ("n", "node_name"), ("v", "verdict"),
    ("dr", "drop_reason"), ("et", "event_type"), ("es", "event_sub_type"), ("ty", "type"),
    ("td", "traffic_direction"), ("op", "trace_observation_point"), ("tr", "trace_reason"),
    ("pm", "policy_match_type"), ("ipv", "ip_version"), ("sip", "source_ip"),
    ("dip", "destination_ip"), ("sm", "source_mac"), ("dm", "destination_mac"),
    ("p", "protocol"), ("sp", "source_port"), ("dp", "destination_port"),
    ("tf", "tcp_flags"), ("it", "icmp_type"), ("ic", "icmp_code"), ("pp", "proxy_port"),
    ("sum", "summary"),
)
"""Wire key ↔ Flow attribute for plain scalars; zero values are left off the wire (time never)."""


def encode_flow(f: Flow) -> Wire:
    """The compact wire dict of ``f`` (default values omitted)."""
    w: Wire = {"t": f.time_ns}
    for key, attr in _SCALARS:
        value = getattr(f, attr)
        if value:
            w[key] = int(value) if isinstance(value, int) else value
    if f.is_reply is not None:
        w["rp"] = f.is_reply
    _put_endpoint(w, "s", f.source)
    _put_endpoint(w, "d", f.destination)
    if f.source_service:
        w["ssv"] = [f.source_service.namespace, f.source_service.name]
    if f.destination_service:
        w["dsv"] = [f.destination_service.namespace, f.destination_service.name]
    if f.source_names:
        w["snm"] = list(f.source_names)
    if f.destination_names:
        w["dnm"] = list(f.destination_names)
    if f.interface:
        w["if"] = list(f.interface)
    if f.l7:
        w["l7"] = _encode_l7(f.l7)
    return w


def decode_flow(w: Wire) -> Flow:
    f = Flow(time_ns=w.get("t", 0))
    for key, attr in _SCALARS:
        if key in w:
            setattr(f, attr, w[key])
    f.type = w.get("ty", FlowType.L3_L4)
    f.is_reply = w.get("rp")
    f.source = _get_endpoint(w, "s")
    f.destination = _get_endpoint(w, "d")
    if "ssv" in w:
        f.source_service = Service(*w["ssv"])
    if "dsv" in w:
        f.destination_service = Service(*w["dsv"])
    f.source_names = list(w.get("snm", ()))
    f.destination_names = list(w.get("dnm", ()))
    if "if" in w:
        f.interface = (w["if"][0], w["if"][1])
    if "l7" in w:
        f.l7 = _decode_l7(w["l7"])
    return f


def _encode_l7(l7: Layer7) -> Wire:
    out: Wire = {"ty": int(l7.type)}
    if l7.latency_ns:
        out["lat"] = l7.latency_ns
    if l7.http:
        h = l7.http
        out["http"] = {"code": h.code, "method": h.method, "url": h.url,
                       "protocol": h.protocol, "headers": [list(kv) for kv in h.headers]}
    if l7.dns:
        d = l7.dns
        out["dns"] = {"query": d.query, "ips": d.ips, "ttl": d.ttl, "cnames": d.cnames,
                      "observation_source": d.observation_source, "rcode": d.rcode,
                      "qtypes": d.qtypes, "rrtypes": d.rrtypes}
    return out


def _decode_l7(w: Wire) -> Layer7:
    l7 = Layer7(type=w.get("ty", 0), latency_ns=w.get("lat", 0))
    if "http" in w:
        h = w["http"]
        l7.http = HTTP(code=h.get("code", 0), method=h.get("method", ""), url=h.get("url", ""),
                       protocol=h.get("protocol", ""),
                       headers=[(k, v) for k, v in h.get("headers", ())])
    if "dns" in w:
        d = w["dns"]
        l7.dns = DNS(query=d.get("query", ""), ips=list(d.get("ips", ())), ttl=d.get("ttl", 0),
                     cnames=list(d.get("cnames", ())),
                     observation_source=d.get("observation_source", ""),
                     rcode=d.get("rcode", 0), qtypes=list(d.get("qtypes", ())),
                     rrtypes=list(d.get("rrtypes", ())))
    return l7


def trace_flow_defaults(f: Flow, trace_point: int) -> Flow:
    """Fill event type and observation point for a trace event as Hubble's parser does."""
    f.event_type = MessageType.TRACE
    f.event_sub_type = trace_point
    f.trace_observation_point = TRACE_POINT_TO_OBSERVATION.get(
        trace_point, TraceObservationPoint.UNKNOWN_POINT)
    return f


def drop_flow_defaults(f: Flow, reason: int) -> Flow:
    """Fill verdict, drop reason and event type for a drop event as Hubble's parser does."""
    f.verdict = Verdict.DROPPED
    f.drop_reason = reason
    f.event_type = MessageType.DROP
    f.event_sub_type = reason
    return f


def l4_protocol_name(proto: int) -> str:
    """The l4 oneof name in flow.Layer4 for an IP protocol number ('' when none)."""
    return _L4_NAMES.get(proto, "")


_L4_NAMES: dict[int, str] = {
    IPProto.TCP: "TCP",
    IPProto.UDP: "UDP",
    IPProto.ICMP: "ICMPv4",
    IPProto.ICMPV6: "ICMPv6",
    IPProto.SCTP: "SCTP",
}

"""Hubble's flow metrics as pure counters; the service exposes them through prometheus-client.

Names and labels follow Hubble's metrics handlers. Each metric can be given a source and a
destination context (``sourceContext=namespace|pod|pod-name|identity|workload-name|ip``),
which adds ``source``/``destination`` labels in front of the metric's own, as Hubble does.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from ciliate.flows.model import LOST_KIND, Wire
from ciliate.flows.tables import (
    TRACE_POINT_NAMES,
    IPProto,
    IPVersion,
    LostEventSource,
    MessageType,
    TCPFlag,
    Verdict,
    drop_reason_name,
)

CONTEXT_OPTIONS = ("namespace", "pod", "pod-name", "identity", "workload-name", "ip")


@dataclass(frozen=True)
class MetricSpec:
    name: str
    help: str
    labels: tuple[str, ...]


SPECS: dict[str, MetricSpec] = {
    "flows-processed": MetricSpec("hubble_flows_processed_total",
                                  "Total number of flows processed", ("type", "subtype",
                                                                      "verdict")),
    "drop": MetricSpec("hubble_drop_total", "Number of drops", ("reason", "protocol")),
    "tcp": MetricSpec("hubble_tcp_flags_total", "TCP flag occurrences", ("flag", "family")),
    "port-distribution": MetricSpec("hubble_port_distribution_total",
                                    "Numbers of packets distributed by destination port",
                                    ("protocol", "port")),
}
"""Hubble metric names by the option name used to enable them (``--metrics drop,tcp``)."""

LOST_SPEC = MetricSpec("hubble_lost_events_total", "Number of lost events", ("source",))


@dataclass
class MetricOptions:
    """One enabled metric: ``drop:sourceContext=namespace;destinationContext=pod``."""

    name: str
    source_context: str = ""
    destination_context: str = ""

    @classmethod
    def parse(cls, text: str) -> MetricOptions:
        name, _, opts = text.partition(":")
        if name not in SPECS:
            raise ValueError(f"unknown metric {name!r}; known: {', '.join(SPECS)}")
        out = cls(name)
        for opt in filter(None, opts.split(";")):
            key, _, value = opt.partition("=")
            if value and value not in CONTEXT_OPTIONS:
                raise ValueError(f"{name}: {key}={value!r}: context must be one of "
                                 f"{', '.join(CONTEXT_OPTIONS)}")
            if key == "sourceContext":
                out.source_context = value
            elif key == "destinationContext":
                out.destination_context = value
            else:
                raise ValueError(f"{name}: unknown option {key!r}")
        return out

    def label_names(self) -> tuple[str, ...]:
        ctx = tuple(n for n, c in (("source", self.source_context),
                                   ("destination", self.destination_context)) if c)
        return ctx + SPECS[self.name].labels


def _context(w: Wire, side: str, option: str) -> str:
    s = "s" if side == "source" else "d"
    if option == "namespace":
        return str(w.get(s + "n", ""))
    if option == "pod":
        ns, pod = w.get(s + "n", ""), w.get(s + "pn", "")
        return f"{ns}/{pod}" if pod else ""
    if option == "pod-name":
        return str(w.get(s + "pn", ""))
    if option == "identity":
        return ",".join(w.get(s + "l", ()))
    if option == "workload-name":
        workloads = w.get(s + "w") or ()
        return str(workloads[0][0]) if workloads else ""
    if option == "ip":
        return str(w.get(s + "ip", ""))
    return ""


_FAMILY = {IPVersion.IPv4: "IPv4", IPVersion.IPv6: "IPv6"}
_PROTO_NAMES = {IPProto.TCP: "TCP", IPProto.UDP: "UDP", IPProto.ICMP: "ICMPv4",
                IPProto.ICMPV6: "ICMPv6", IPProto.SCTP: "SCTP"}


def flow_protocol(w: Wire) -> str:
    """Hubble's FlowProtocol: the L7 protocol when there is one, else the L4 name."""
    l7 = w.get("l7")
    if l7:
        if "http" in l7:
            return "HTTP"
        if "dns" in l7:
            return "DNS"
        return "Kafka" if "kafka" in l7 else "Unknown"
    return _PROTO_NAMES.get(w.get("p", 0), "Unknown")


def _type_subtype(w: Wire) -> tuple[str, str]:
    et = w.get("et", 0)
    if et == MessageType.ACCESS_LOG:
        l7 = w.get("l7") or {}
        sub = "HTTP" if "http" in l7 else "DNS" if "dns" in l7 else "Kafka" if "kafka" in l7 \
            else ""
        return "L7", sub
    if et == MessageType.DROP:
        return "Drop", ""
    if et == MessageType.CAPTURE:
        return "Capture", ""
    if et == MessageType.TRACE:
        return "Trace", TRACE_POINT_NAMES.get(w.get("es", 0), "")
    if et == MessageType.POLICY_VERDICT:
        return "PolicyVerdict", ""
    return "Unknown", str(et)


def _verdict(w: Wire) -> str:
    try:
        return Verdict(w.get("v", 0)).name
    except ValueError:
        return str(w.get("v", 0))


@dataclass
class FlowMetrics:
    """Counters keyed by label-value tuples, in ``options[i].label_names()`` order."""

    options: list[MetricOptions] = field(default_factory=list)
    counters: dict[str, Counter[tuple[str, ...]]] = field(default_factory=dict)
    lost: Counter[tuple[str, ...]] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        for opt in self.options:
            self.counters.setdefault(opt.name, Counter())

    @classmethod
    def from_config(cls, texts: Iterable[str]) -> FlowMetrics:
        return cls([MetricOptions.parse(t) for t in texts])

    def observe(self, w: Wire) -> None:
        self.observe_many([w])

    def observe_many(self, batch: list[Wire]) -> None:
        """Count a batch; one pass per enabled metric keeps the per-flow work small."""
        flows = [w for w in batch if w.get("k") != LOST_KIND]
        if len(flows) != len(batch):
            for w in batch:
                if w.get("k") == LOST_KIND:
                    self.observe_lost(w.get("ls", 0), w.get("ln", 0))
        for opt in self.options:
            counter = self.counters[opt.name]
            ctx_of = _context_fn(opt)
            if opt.name == "flows-processed":
                for w in flows:
                    typ, sub = _type_subtype(w)
                    counter[(*ctx_of(w), typ, sub, _verdict(w))] += 1
            elif opt.name == "drop":
                for w in flows:
                    if w.get("v") == Verdict.DROPPED:
                        counter[(*ctx_of(w), drop_reason_name(w.get("dr", 0)),
                                 flow_protocol(w))] += 1
            elif opt.name == "tcp":
                for w in flows:
                    if w.get("p") == IPProto.TCP:
                        family = _FAMILY.get(w.get("ipv", 0), "")
                        ctx = ctx_of(w)
                        for flag in _tcp_flag_labels(w.get("tf", 0)):
                            counter[(*ctx, flag, family)] += 1
            elif opt.name == "port-distribution":
                for w in flows:
                    if (w.get("v") == Verdict.FORWARDED and not w.get("rp")
                            and w.get("p") in _PROTO_NAMES and w.get("dp")):
                        counter[(*ctx_of(w), _PROTO_NAMES[w["p"]], str(w["dp"]))] += 1

    def observe_lost(self, source: int, count: int) -> None:
        try:
            name = LostEventSource(source).name.lower()
        except ValueError:
            name = str(source)
        self.lost[(name,)] += count

    def samples(self) -> list[tuple[MetricSpec, tuple[str, ...], dict[tuple[str, ...], int]]]:
        """(spec, label names, {label values: count}) for every enabled metric and lost events."""
        out = [(SPECS[o.name], o.label_names(), dict(self.counters[o.name]))
               for o in self.options]
        out.append((LOST_SPEC, LOST_SPEC.labels, dict(self.lost)))
        return out


def _context_fn(opt: MetricOptions) -> Callable[[Wire], tuple[str, ...]]:
    src, dst = opt.source_context, opt.destination_context
    if not src and not dst:
        return lambda w: ()
    if src and dst:
        return lambda w: (_context(w, "source", src), _context(w, "destination", dst))
    if src:
        return lambda w: (_context(w, "source", src),)
    return lambda w: (_context(w, "destination", dst),)


_TCP_LABELS: dict[int, list[str]] = {}


def _tcp_flag_labels(bits: int) -> list[str]:
    labels = _TCP_LABELS.get(bits)
    if labels is None:
        labels = _TCP_LABELS[bits] = _tcp_flag_labels_uncached(bits)
    return labels


def _tcp_flag_labels_uncached(bits: int) -> list[str]:
    """Hubble's tcp handler labels: SYN, SYN-ACK, FIN, RST (plus PSH/URG/ECE/CWR/NS)."""
    out: list[str] = []
    if bits & TCPFlag.SYN:
        out.append("SYN-ACK" if bits & TCPFlag.ACK else "SYN")
    for flag in (TCPFlag.FIN, TCPFlag.RST, TCPFlag.PSH, TCPFlag.URG, TCPFlag.ECE,
                 TCPFlag.CWR, TCPFlag.NS):
        if bits & flag:
            out.append(str(flag.name))
    return out

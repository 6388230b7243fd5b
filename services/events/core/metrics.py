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


_CONTEXT_RAW: dict[str, str] = {
    "namespace": "w.get('{s}n', '')",
    "pod": "w.get('{s}n', ''), w.get('{s}pn', '')",
    "pod-name": "w.get('{s}pn', '')",
    "identity": "tuple(w.get('{s}l', ()))",
    "workload-name": "(w.get('{s}w') or (('',),))[0][0]",
    "ip": "w.get('{s}ip', '')",
}
"""Per context option: the raw wire fields its label is made from (``{s}`` = s or d)."""

_L7_KEYS = "w.get('l7') and tuple(w['l7'])"
_METRIC_RAW: dict[str, str] = {
    "flows-processed": f"({{ctx}} w.get('et', 0), w.get('es', 0), w.get('v', 0), {_L7_KEYS})",
    "drop": f"w.get('v') == {int(Verdict.DROPPED)} and ({{ctx}} w.get('dr', 0), "
            f"w.get('p', 0), {_L7_KEYS})",
    "tcp": f"w.get('p') == {int(IPProto.TCP)} and ({{ctx}} w.get('tf', 0), w.get('ipv', 0))",
    "port-distribution": f"w.get('v') == {int(Verdict.FORWARDED)} and not w.get('rp') and "
                         f"w.get('p') in _ported and w.get('dp', 0) and "
                         f"({{ctx}} w.get('p'), w.get('dp'))",
}
"""Per metric: the raw wire fields its labels depend on; a falsy tail means "not counted".

A metric counts a batch with one C-level ``Counter`` over these raw keys and turns each
distinct key into Prometheus labels once (cached): the labels are a function of the key.
"""

RawKey = Callable[[Wire], tuple[object, ...]]


def _raw_key_fn(opt: MetricOptions) -> RawKey:
    ctx = "".join(_CONTEXT_RAW[c].format(s=side) + ", " for side, c in
                  (("s", opt.source_context), ("d", opt.destination_context)) if c)
    body = _METRIC_RAW[opt.name]
    expr = body.format(ctx=ctx)
    scope: dict[str, object] = {"__builtins__": {}, "tuple": tuple,
                                "_ported": frozenset(_PROTO_NAMES)}
    fn: RawKey = eval(f"lambda w: (w.get('k'), {expr})", scope)  # our own text, no input
    return fn


_KEY_CACHE_LIMIT = 1 << 16


@dataclass
class FlowMetrics:
    """Counters keyed by label-value tuples, in ``options[i].label_names()`` order."""

    options: list[MetricOptions] = field(default_factory=list)
    counters: dict[str, Counter[tuple[str, ...]]] = field(default_factory=dict)
    lost: Counter[tuple[str, ...]] = field(default_factory=Counter)
    _compiled: list[tuple[MetricOptions, RawKey, dict[object, list[tuple[str, ...]]]]] = field(
        default_factory=list, repr=False)

    def __post_init__(self) -> None:
        for opt in self.options:
            self.counters.setdefault(opt.name, Counter())
            self._compiled.append((opt, _raw_key_fn(opt), {}))

    @classmethod
    def from_config(cls, texts: Iterable[str]) -> FlowMetrics:
        return cls([MetricOptions.parse(t) for t in texts])

    def observe(self, w: Wire) -> None:
        self.observe_many([w])

    def observe_many(self, batch: list[Wire]) -> None:
        """Count a batch: per metric one ``Counter`` over raw keys, labels made per distinct key."""
        saw_lost = not self._compiled
        for opt, raw_key, label_cache in self._compiled:
            keys = list(map(raw_key, batch))
            reps: dict[object, Wire] | None = None
            counter = self.counters[opt.name]
            for key, count in Counter(keys).items():
                if key[0] == LOST_KIND:
                    saw_lost = True
                    continue
                labels = label_cache.get(key)
                if labels is None:
                    if reps is None:
                        reps = dict(zip(keys, batch, strict=True))
                    if len(label_cache) >= _KEY_CACHE_LIMIT:
                        label_cache.clear()
                    labels = label_cache[key] = flow_labels(opt, reps[key]) if key[1] else []
                for label in labels:
                    counter[label] += count
        if saw_lost:
            for w in batch:
                if w.get("k") == LOST_KIND:
                    self.observe_lost(w.get("ls", 0), w.get("ln", 0))

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


def flow_labels(opt: MetricOptions, w: Wire) -> list[tuple[str, ...]]:
    """The label tuples one flow adds to ``opt``'s metric (none when it is not counted)."""
    ctx = _context_fn(opt)(w)
    if opt.name == "flows-processed":
        typ, sub = _type_subtype(w)
        return [(*ctx, typ, sub, _verdict(w))]
    if opt.name == "drop":
        if w.get("v") != Verdict.DROPPED:
            return []
        return [(*ctx, drop_reason_name(w.get("dr", 0)), flow_protocol(w))]
    if opt.name == "tcp":
        if w.get("p") != IPProto.TCP:
            return []
        family = _FAMILY.get(w.get("ipv", 0), "")
        return [(*ctx, flag, family) for flag in _tcp_flag_labels(w.get("tf", 0))]
    if opt.name == "port-distribution":
        if (w.get("v") == Verdict.FORWARDED and not w.get("rp")
                and w.get("p") in _PROTO_NAMES and w.get("dp")):
            return [(*ctx, _PROTO_NAMES[w["p"]], str(w["dp"]))]
        return []
    return []


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

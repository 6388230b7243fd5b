"""Hubble's flow filters over the flat wire records, without decoding a flow.

Semantics as Hubble's FlowFilter: a request has a whitelist and a blacklist, each a list of
filters ORed; inside one filter every set field must match (AND); inside one field any of its
values may match (OR). A record passes when it matches the whitelist (or the whitelist is
empty) and matches no blacklist filter. Lost-event records always pass: loss is never hidden.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from ciliate.flows.model import LOST_KIND, Wire
from ciliate.flows.tables import (
    DropReason,
    IPProto,
    IPVersion,
    TCPFlag,
    TrafficDirection,
    Verdict,
)
from services.events.core.labelsel import SelectorError, index_labels, parse_selector

Predicate = Callable[[Wire], bool]


class FilterError(ValueError):
    """A filter value that cannot be understood; ``field`` names the filter field."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name
        self.message = message


@dataclass(frozen=True, slots=True)
class EventTypeFilter:
    type: int
    sub_type: int | None = None


@dataclass
class FlowFilter:
    """flow.FlowFilter (the subset Ciliate serves), field names as in the proto."""

    uuid: list[str] = field(default_factory=list)
    source_ip: list[str] = field(default_factory=list)
    destination_ip: list[str] = field(default_factory=list)
    source_pod: list[str] = field(default_factory=list)
    destination_pod: list[str] = field(default_factory=list)
    source_service: list[str] = field(default_factory=list)
    destination_service: list[str] = field(default_factory=list)
    source_label: list[str] = field(default_factory=list)
    destination_label: list[str] = field(default_factory=list)
    source_identity: list[int] = field(default_factory=list)
    destination_identity: list[int] = field(default_factory=list)
    source_port: list[str] = field(default_factory=list)
    destination_port: list[str] = field(default_factory=list)
    source_workload: list[str] = field(default_factory=list)
    destination_workload: list[str] = field(default_factory=list)
    verdict: list[str] = field(default_factory=list)
    drop_reason_desc: list[str] = field(default_factory=list)
    event_type: list[EventTypeFilter] = field(default_factory=list)
    protocol: list[str] = field(default_factory=list)
    http_status_code: list[str] = field(default_factory=list)
    http_method: list[str] = field(default_factory=list)
    http_path: list[str] = field(default_factory=list)
    node_name: list[str] = field(default_factory=list)
    tcp_flags: list[list[str]] = field(default_factory=list)
    traffic_direction: list[str] = field(default_factory=list)
    ip_version: list[str] = field(default_factory=list)
    reply: list[bool] = field(default_factory=list)

    def is_empty(self) -> bool:
        return not any(getattr(self, f.name) for f in fields(self))

    def to_json(self) -> dict[str, Any]:
        """Hubble's JSON for a FlowFilter (only set fields)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if not value:
                continue
            if f.name == "event_type":
                out[f.name] = [
                    {"type": e.type} if e.sub_type is None
                    else {"type": e.type, "match_sub_type": True, "sub_type": e.sub_type}
                    for e in value
                ]
            elif f.name == "tcp_flags":
                out[f.name] = [{flag: True for flag in flags} for flags in value]
            else:
                out[f.name] = list(value)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FlowFilter:
        known = {f.name for f in fields(cls)}
        ff = cls()
        for key, value in data.items():
            if key not in known:
                raise FilterError(key, "unknown filter field")
            if not isinstance(value, list):
                raise FilterError(key, "must be a list")
            if key == "event_type":
                ff.event_type = [
                    EventTypeFilter(int(e["type"]),
                                    int(e.get("sub_type", 0)) if e.get("match_sub_type") else None)
                    for e in value
                ]
            elif key == "tcp_flags":
                ff.tcp_flags = [[k for k, v in flags.items() if v] for flags in value]
            else:
                setattr(ff, key, list(value))
        return ff


# --- per-field predicate builders ------------------------------------------------------------


def _ip_pred(key: str, values: list[str], name: str) -> Predicate:
    exact: set[str] = set()
    nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    for v in values:
        try:
            if "/" in v:
                nets.append(ipaddress.ip_network(v, strict=False))
            else:
                exact.add(str(ipaddress.ip_address(v)))
        except ValueError as err:
            raise FilterError(name, f"invalid IP or CIDR {v!r}") from err

    def pred(w: Wire) -> bool:
        ip = w.get(key)
        if not ip:
            return False
        if ip in exact:
            return True
        if nets:
            addr = ipaddress.ip_address(ip)
            return any(addr in n for n in nets)
        return False

    return pred


def parse_namespace_name(text: str) -> tuple[str, str]:
    """Hubble's ``[namespace/]name`` parsing: a bare name is in namespace ``default``."""
    if "/" in text:
        ns, _, name = text.partition("/")
        return ns, name
    if not text:
        return "", ""
    return "default", text


def _pod_pred(ns_key: str, name_key: str, values: list[str], name: str) -> Predicate:
    wanted: list[tuple[str, str]] = []
    for v in values:
        ns, prefix = parse_namespace_name(v)
        if not ns and not prefix:
            raise FilterError(name, f"invalid filter, must be [namespace/][<name>], got {v!r}")
        wanted.append((ns, prefix))

    def pred(w: Wire) -> bool:
        ns = w.get(ns_key, "")
        pod = w.get(name_key, "")
        if not ns and not pod:
            return False
        return any(ns == want_ns and pod.startswith(prefix) for want_ns, prefix in wanted)

    return pred


def _service_pred(key: str, values: list[str], name: str) -> Predicate:
    wanted = [parse_namespace_name(v) for v in values]

    def pred(w: Wire) -> bool:
        svc = w.get(key)
        if not svc:
            return False
        ns, svc_name = svc[0], svc[1]
        return any(ns == want_ns and svc_name.startswith(prefix) for want_ns, prefix in wanted)

    return pred


class _LabelMatches(dict[tuple[str, ...], bool]):
    """label tuple → whether any selector matches: a dict, so a compiled filter looks a flow's
    labels up with one subscript and computes only label sets it has not seen (bounded)."""

    def __init__(self, selectors: list[Callable[[Any], bool]]) -> None:
        super().__init__()
        self.selectors = selectors

    def __missing__(self, labels: tuple[str, ...]) -> bool:
        if len(self) >= 4096:
            self.clear()
        idx = index_labels(labels)
        hit = self[labels] = any(s(idx) for s in self.selectors)
        return hit


def _label_expr(env: _Env, key: str, values: list[str], name: str) -> str:
    try:
        selectors = [parse_selector(v) for v in values]
    except SelectorError as err:
        raise FilterError(name, str(err)) from err
    # tuple() returns a decoded tuple itself; a list (Flow.to_wire) is copied to be hashable.
    return f"{env.bind(_LabelMatches(selectors))}[{env.bind(tuple)}(w.get({key!r}, ()))]"


def _int_set_pred(key: str, values: set[int]) -> Predicate:
    def pred(w: Wire) -> bool:
        return w.get(key, 0) in values

    return pred


_PORTED = frozenset({IPProto.TCP, IPProto.UDP, IPProto.SCTP})


def _port_pred(key: str, values: list[str], name: str) -> Predicate:
    ports: set[int] = set()
    for v in values:
        try:
            port = int(v)
        except ValueError as err:
            raise FilterError(name, f"invalid port {v!r}") from err
        if not 0 <= port <= 65535:
            raise FilterError(name, f"invalid port {v!r}")
        ports.add(port)

    def pred(w: Wire) -> bool:
        return w.get("p", 0) in _PORTED and w.get(key, 0) in ports

    return pred


def _workload_pred(key: str, values: list[str]) -> Predicate:
    wanted = []
    for v in values:
        kind, _, wl_name = v.rpartition("/")
        wanted.append((kind, wl_name))

    def pred(w: Wire) -> bool:
        for wl_name, kind in w.get(key, ()):
            for want_kind, want_name in wanted:
                if (not want_name or want_name == wl_name) and (
                        not want_kind or want_kind.lower() == kind.lower()):
                    return True
        return False

    return pred


def _enum_values(enum: type[Any], values: list[str], name: str) -> set[int]:
    """Enum numbers for names (case-insensitive) or numbers."""
    by_name = {member.name.upper(): int(member) for member in enum}
    out: set[int] = set()
    for v in values:
        if v.isdigit():
            out.add(int(v))
        elif v.upper() in by_name:
            out.add(by_name[v.upper()])
        else:
            raise FilterError(name, f"invalid value {v!r}")
    return out


def _event_type_pred(values: list[EventTypeFilter]) -> Predicate:
    def pred(w: Wire) -> bool:
        et = w.get("et", 0)
        es = w.get("es", 0)
        return any(e.type == et and (e.sub_type is None or e.sub_type == es) for e in values)

    return pred


_L4_PROTOCOLS: dict[str, frozenset[int]] = {
    "tcp": frozenset({IPProto.TCP}),
    "udp": frozenset({IPProto.UDP}),
    "sctp": frozenset({IPProto.SCTP}),
    "icmp": frozenset({IPProto.ICMP, IPProto.ICMPV6}),
    "icmpv4": frozenset({IPProto.ICMP}),
    "icmpv6": frozenset({IPProto.ICMPV6}),
}
_L7_PROTOCOLS = frozenset({"http", "dns", "kafka"})


def _protocol_pred(values: list[str], name: str) -> Predicate:
    l4: set[int] = set()
    l7: set[str] = set()
    for v in values:
        p = v.lower()
        if p in _L4_PROTOCOLS:
            l4 |= _L4_PROTOCOLS[p]
        elif p in _L7_PROTOCOLS:
            l7.add(p)
        else:
            raise FilterError(name, f"unknown protocol: {v!r}")

    def pred(w: Wire) -> bool:
        if w.get("p", 0) in l4:
            return True
        rec = w.get("l7")
        return rec is not None and any(k in rec for k in l7)

    return pred


def _http_status_pred(values: list[str], name: str) -> Predicate:
    exact: set[int] = set()
    prefixes: list[str] = []
    for v in values:
        if v.endswith("+") and v[:-1].isdigit() and 1 <= len(v) - 1 <= 2:
            prefixes.append(v[:-1])
        elif v.isdigit() and len(v) == 3:
            exact.add(int(v))
        else:
            raise FilterError(name, f"invalid status code {v!r}, expected NNN, N+ or NN+")

    def pred(w: Wire) -> bool:
        http = (w.get("l7") or {}).get("http")
        if not http or not http.get("code"):
            return False
        code = http["code"]
        return code in exact or any(str(code).startswith(p) for p in prefixes)

    return pred


def _http_method_pred(values: list[str]) -> Predicate:
    methods = {v.upper() for v in values}

    def pred(w: Wire) -> bool:
        http = (w.get("l7") or {}).get("http")
        return http is not None and str(http.get("method", "")).upper() in methods

    return pred


def _http_path_pred(values: list[str], name: str) -> Predicate:
    try:
        patterns = [re.compile(v) for v in values]
    except re.error as err:
        raise FilterError(name, f"invalid regular expression: {err}") from err

    def pred(w: Wire) -> bool:
        http = (w.get("l7") or {}).get("http")
        if not http:
            return False
        url = str(http.get("url", ""))
        path = re.sub(r"^[a-z]+://[^/]*", "", url).split("?", 1)[0]
        return any(p.search(path) for p in patterns)

    return pred


def _node_pred(values: list[str]) -> Predicate:
    patterns = [v.rpartition("/")[2] if "/" in v else v for v in values]

    def pred(w: Wire) -> bool:
        node = w.get("n", "")
        return any(fnmatch.fnmatchcase(node, p) for p in patterns)

    return pred


def _tcp_flags_pred(values: list[list[str]], name: str) -> Predicate:
    masks: list[int] = []
    for flags in values:
        mask = 0
        for f in flags:
            try:
                mask |= TCPFlag[f.upper()]
            except KeyError as err:
                raise FilterError(name, f"unknown tcp flag: {f}") from err
        masks.append(mask)

    def pred(w: Wire) -> bool:
        if w.get("p") != IPProto.TCP:
            return False
        bits = w.get("tf", 0)
        return any(bits & m == m for m in masks)

    return pred


def _reply_pred(values: list[bool]) -> Predicate:
    wanted = set(values)

    def pred(w: Wire) -> bool:
        rp = w.get("rp")
        return rp is not None and rp in wanted

    return pred


# --- compilation: one Python expression per filter set, evaluated once per record ------------
#
# Each set field becomes an inline expression over the wire dict ``w`` (``w.get("v", 0) in
# _c3``) where that is a plain lookup, or a call of one of the predicates above where the
# field needs more (labels, CIDRs, HTTP). A whole whitelist/blacklist pair then compiles to one
# lambda and one list comprehension over a batch: no Python call per field per record.


class _Env:
    """The constants and helper predicates a generated expression refers to, by name."""

    def __init__(self) -> None:
        self.names: dict[str, object] = {}

    def bind(self, value: object) -> str:
        name = f"_c{len(self.names)}"
        self.names[name] = value
        return name

    def call(self, pred: Predicate) -> str:
        return f"{self.bind(pred)}(w)"

    def member(self, key: str, values: object, default: object = 0) -> str:
        return f"w.get({key!r}, {default!r}) in {self.bind(frozenset(values))}"  # type: ignore[call-overload]


def _pod_expr(env: _Env, ns_key: str, name_key: str, values: list[str], name: str) -> str:
    terms: list[str] = []
    for v in values:
        ns, prefix = parse_namespace_name(v)
        if not ns and not prefix:
            raise FilterError(name, f"invalid filter, must be [namespace/][<name>], got {v!r}")
        term = f"w.get({ns_key!r}, '') == {ns!r}"
        if prefix:
            term += f" and w.get({name_key!r}, '').startswith({prefix!r})"
        terms.append(f"({term})")
    return " or ".join(terms)


def _ip_expr(env: _Env, key: str, values: list[str], name: str) -> str:
    if any("/" in v for v in values):
        return env.call(_ip_pred(key, values, name))
    exact: set[str] = set()
    for v in values:
        try:
            exact.add(str(ipaddress.ip_address(v)))
        except ValueError as err:
            raise FilterError(name, f"invalid IP or CIDR {v!r}") from err
    return env.member(key, exact, None)


def _port_expr(env: _Env, key: str, values: list[str], name: str) -> str:
    ports: set[int] = set()
    for v in values:
        try:
            port = int(v)
        except ValueError as err:
            raise FilterError(name, f"invalid port {v!r}") from err
        if not 0 <= port <= 65535:
            raise FilterError(name, f"invalid port {v!r}")
        ports.add(port)
    return f"{env.member('p', _PORTED)} and {env.member(key, ports)}"


def _protocol_expr(env: _Env, values: list[str], name: str) -> str:
    if any(v.lower() in _L7_PROTOCOLS for v in values):
        return env.call(_protocol_pred(values, name))
    l4: set[int] = set()
    for v in values:
        if v.lower() not in _L4_PROTOCOLS:
            raise FilterError(name, f"unknown protocol: {v!r}")
        l4 |= _L4_PROTOCOLS[v.lower()]
    return env.member("p", l4)


def _tcp_flags_expr(env: _Env, values: list[list[str]], name: str) -> str:
    if len(values) != 1:
        return env.call(_tcp_flags_pred(values, name))
    mask = 0
    for f in values[0]:
        try:
            mask |= TCPFlag[f.upper()]
        except KeyError as err:
            raise FilterError(name, f"unknown tcp flag: {f}") from err
    return f"w.get('p') == {int(IPProto.TCP)} and w.get('tf', 0) & {mask} == {mask}"


def _node_expr(env: _Env, values: list[str]) -> str:
    patterns = [v.rpartition("/")[2] if "/" in v else v for v in values]
    if any(set(p) & set("*?[") for p in patterns):
        return env.call(_node_pred(values))
    return env.member("n", patterns, "")


def _event_type_expr(env: _Env, values: list[EventTypeFilter]) -> str:
    if any(e.sub_type is not None for e in values):
        return env.call(_event_type_pred(values))
    return env.member("et", {e.type for e in values})


def _ip_version_values(values: list[str]) -> set[int]:
    aliases = {"4": "IPv4", "6": "IPv6", "v4": "IPv4", "v6": "IPv6"}
    return _enum_values(IPVersion, [aliases.get(v.lower(), v) for v in values], "ip_version")


def filter_expr(ff: FlowFilter, env: _Env) -> str:
    """One FlowFilter as a Python expression over ``w``: every set field must match (AND)."""
    parts: list[str] = []
    if ff.uuid:
        parts.append(env.member("u", ff.uuid, None))
    if ff.source_ip:
        parts.append(_ip_expr(env, "sip", ff.source_ip, "source_ip"))
    if ff.destination_ip:
        parts.append(_ip_expr(env, "dip", ff.destination_ip, "destination_ip"))
    if ff.source_pod:
        parts.append(_pod_expr(env, "sn", "spn", ff.source_pod, "source_pod"))
    if ff.destination_pod:
        parts.append(_pod_expr(env, "dn", "dpn", ff.destination_pod, "destination_pod"))
    if ff.source_service:
        parts.append(env.call(_service_pred("ssv", ff.source_service, "source_service")))
    if ff.destination_service:
        parts.append(env.call(_service_pred("dsv", ff.destination_service,
                                            "destination_service")))
    if ff.source_label:
        parts.append(_label_expr(env, "sl", ff.source_label, "source_label"))
    if ff.destination_label:
        parts.append(_label_expr(env, "dl", ff.destination_label, "destination_label"))
    if ff.source_identity:
        parts.append(env.member("si", ff.source_identity))
    if ff.destination_identity:
        parts.append(env.member("di", ff.destination_identity))
    if ff.source_port:
        parts.append(_port_expr(env, "sp", ff.source_port, "source_port"))
    if ff.destination_port:
        parts.append(_port_expr(env, "dp", ff.destination_port, "destination_port"))
    if ff.source_workload:
        parts.append(env.call(_workload_pred("sw", ff.source_workload)))
    if ff.destination_workload:
        parts.append(env.call(_workload_pred("dw", ff.destination_workload)))
    if ff.verdict:
        parts.append(env.member("v", _enum_values(Verdict, ff.verdict, "verdict")))
    if ff.drop_reason_desc:
        parts.append(env.member("dr", _enum_values(DropReason, ff.drop_reason_desc,
                                                   "drop_reason_desc")))
    if ff.event_type:
        parts.append(_event_type_expr(env, ff.event_type))
    if ff.protocol:
        parts.append(_protocol_expr(env, ff.protocol, "protocol"))
    if ff.http_status_code:
        parts.append(env.call(_http_status_pred(ff.http_status_code, "http_status_code")))
    if ff.http_method:
        parts.append(env.call(_http_method_pred(ff.http_method)))
    if ff.http_path:
        parts.append(env.call(_http_path_pred(ff.http_path, "http_path")))
    if ff.node_name:
        parts.append(_node_expr(env, ff.node_name))
    if ff.tcp_flags:
        parts.append(_tcp_flags_expr(env, ff.tcp_flags, "tcp_flags"))
    if ff.traffic_direction:
        parts.append(env.member("td", _enum_values(TrafficDirection, ff.traffic_direction,
                                                   "traffic_direction")))
    if ff.ip_version:
        parts.append(env.member("ipv", _ip_version_values(ff.ip_version)))
    if ff.reply:
        parts.append(env.member("rp", ff.reply, None))
    if not parts:
        return "True"
    return " and ".join(f"({p})" for p in parts)


def _compile(expr: str, env: _Env, template: str) -> Any:
    """Build a function from generated source; only our own expressions reach here."""
    scope: dict[str, Any] = {"__builtins__": {}, **env.names}
    return eval(template.format(expr=expr), scope)


def compile_filter(ff: FlowFilter) -> Predicate:
    """One FlowFilter as a single predicate: every set field must match."""
    env = _Env()
    pred: Predicate = _compile(filter_expr(ff, env), env, "lambda w: {expr}")
    return pred


BatchSelect = Callable[[list[Wire]], list[Wire]]
"""The records of a batch that pass a filter set, in order."""


class FilterSet:
    """A compiled whitelist/blacklist pair: ``match(record)`` and ``select(batch)``.

    ``select`` is the ingest hot path: one list comprehension over the batch with the whole
    filter set inlined. A filter set that passes everything selects the batch itself.
    """

    __slots__ = ("blacklist", "expression", "key", "match", "pass_all", "select", "whitelist")

    def __init__(self, whitelist: Sequence[FlowFilter] = (),
                 blacklist: Sequence[FlowFilter] = ()) -> None:
        self.whitelist = list(whitelist)
        self.blacklist = list(blacklist)
        env = _Env()
        white = [filter_expr(f, env) for f in self.whitelist]
        black = [filter_expr(f, env) for f in self.blacklist]
        self.pass_all = not white and not black
        self.key: object = json.dumps(self.to_json(), sort_keys=True)
        """Equal keys select equal records: followers with the same filters share one pass."""
        terms = []
        if white:
            terms.append(" or ".join(f"({e})" for e in white))
        if black:
            terms.append("not (" + " or ".join(f"({e})" for e in black) + ")")
        # Lost-event records always pass: loss is never hidden by a filter.
        # ('k' is on lost-event records only: the cheap test comes first.)
        self.expression = (f"({' and '.join(f'({t})' for t in terms)}) "
                           f"or ('k' in w and w['k'] == {LOST_KIND!r})") if terms else "True"
        self.match: Predicate = _compile(self.expression, env, "lambda w: {expr}")
        self.select: BatchSelect = (
            _identity if self.pass_all
            else _compile(self.expression, env, "lambda batch: [w for w in batch if {expr}]"))

    @classmethod
    def from_predicate(cls, match: Predicate) -> FilterSet:
        """A filter set deciding with ``match`` (records that are not flows, e.g. processes)."""
        fs = cls()
        fs.pass_all = False
        fs.key = ("predicate", id(match))
        fs.match = match
        fs.select = lambda batch: [w for w in batch if match(w)]
        return fs

    def is_pass_all(self) -> bool:
        return self.pass_all

    def to_json(self) -> dict[str, Any]:
        return {"whitelist": [f.to_json() for f in self.whitelist],
                "blacklist": [f.to_json() for f in self.blacklist]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FilterSet:
        return cls([FlowFilter.from_json(f) for f in data.get("whitelist") or ()],
                   [FlowFilter.from_json(f) for f in data.get("blacklist") or ()])


def _identity(batch: list[Wire]) -> list[Wire]:
    return batch

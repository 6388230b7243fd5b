"""``hubble observe`` filter flags → whitelist/blacklist FlowFilters, as the hubble CLI builds them.

Each flag list (white or black) is built as a pair of filters, *left* and *right*, later ORed.
Flags naming one side (``--from-pod``, ``--verdict``...) go into both; flags naming either side
(``--pod``, ``--ip``, ``--label``, ``--port``, ``--identity``...) put the source form into left
and the destination form into right, so ``--pod x`` means "x is the source OR the destination".
Repeating a flag ORs its values; different flags AND. ``--not`` sends the next flag (only that
one) to the blacklist. ``--namespace`` narrows left's source and right's destination pods.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from ciliate.flows.tables import MESSAGE_TYPE_NAMES, TRACE_POINT_NAMES, MessageType
from ciliate.labels.reserved import ReservedIdentity
from services.events.core.filters import EventTypeFilter, FilterError, FlowFilter

FILTER_FLAGS: tuple[str, ...] = (
    "not", "uuid",
    "pod", "from-pod", "to-pod",
    "ip", "from-ip", "to-ip", "ipv4", "ipv6", "ip-version",
    "label", "from-label", "to-label",
    "namespace", "from-namespace", "to-namespace",
    "service", "from-service", "to-service",
    "port", "from-port", "to-port",
    "identity", "from-identity", "to-identity",
    "workload", "from-workload", "to-workload",
    "verdict", "drop-reason-desc", "type", "protocol",
    "http-status", "http-method", "http-path",
    "node-name", "tcp-flags", "traffic-direction",
)
"""Every filter flag ``ciliate observe`` accepts, spelled as hubble's."""

VALUELESS_FLAGS = frozenset({"not", "ipv4", "ipv6"})

_CONFLICTS: tuple[tuple[str, ...], ...] = (
    ("from-ip", "ip", "from-namespace", "namespace"),
    ("from-ip", "ip", "from-pod", "pod"),
    ("to-ip", "ip", "to-namespace", "namespace"),
    ("to-ip", "ip", "to-pod", "pod"),
    ("to-pod", "namespace"),
    ("from-pod", "namespace"),
    ("to-service", "namespace"),
    ("from-service", "namespace"),
    ("label", "from-label"),
    ("label", "to-label"),
    ("service", "from-service"),
    ("service", "to-service"),
    ("port", "to-port"),
    ("port", "from-port"),
    ("identity", "to-identity"),
    ("identity", "from-identity"),
    ("workload", "to-workload"),
    ("workload", "from-workload"),
)
"""Flag pairs hubble refuses to combine in one list (they would make left/right ambiguous)."""


def parse_identity(value: str) -> int:
    """A numeric identity or a reserved name (``world``, ``host``, ``remote-node``...)."""
    if value.isdigit():
        return int(value)
    for reserved in ReservedIdentity:
        if reserved.label_name == value:
            return int(reserved)
    names = ", ".join(r.label_name for r in ReservedIdentity)
    raise FilterError("identity", f"invalid security identity {value!r}, expected one of "
                                  f"{names} or a numeric value")


def parse_event_type(value: str) -> EventTypeFilter:
    """``--type`` values: ``drop``, ``trace:to-endpoint``, ``policy-verdict``, ``l7``, ``4:3``."""
    head, _, sub = value.partition(":")
    if head in MESSAGE_TYPE_NAMES:
        type_number = int(MESSAGE_TYPE_NAMES[head])
    elif head.isdigit():
        type_number = int(head)
    else:
        raise FilterError("type", f"unable to parse type {head!r}, not a known type name "
                                  f"({', '.join(MESSAGE_TYPE_NAMES)}) and not numeric")
    if not sub:
        return EventTypeFilter(type_number)
    if type_number == MessageType.TRACE:
        for number, name in TRACE_POINT_NAMES.items():
            if name == sub:
                return EventTypeFilter(type_number, number)
    if sub.isdigit():
        return EventTypeFilter(type_number, int(sub))
    raise FilterError("type", f"unable to parse event sub-type {sub!r}")


@dataclass
class _Tracker:
    """hubble's filterTracker: the left/right pair of one list and its namespace modifiers."""

    left: FlowFilter | None = None
    right: FlowFilter | None = None
    ns: list[str] = field(default_factory=list)
    src_ns: list[str] = field(default_factory=list)
    dst_ns: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)

    def apply_left(self, update: Callable[[FlowFilter], None]) -> None:
        if self.left is None:
            self.left = FlowFilter()
        update(self.left)

    def apply_right(self, update: Callable[[FlowFilter], None]) -> None:
        if self.right is None:
            self.right = FlowFilter()
        update(self.right)

    def apply(self, update: Callable[[FlowFilter], None]) -> None:
        self.apply_left(update)
        self.apply_right(update)

    def filters(self) -> list[FlowFilter]:
        if self.left is None and self.right is None and not (self.ns or self.src_ns
                                                             or self.dst_ns):
            return []
        left = self.left or FlowFilter()
        right = self.right or FlowFilter()
        if self.dst_ns:
            _apply_dest_ns(left, self.dst_ns)
            _apply_dest_ns(right, self.dst_ns)
        if self.src_ns:
            _apply_src_ns(left, self.src_ns)
            _apply_src_ns(right, self.src_ns)
        if self.ns:
            _apply_src_ns(left, self.ns)
            _apply_dest_ns(right, self.ns)
        return [left] if left == right else [left, right]


def _add_namespaces(names: list[str], namespaces: list[str]) -> list[str]:
    if not namespaces or not names:
        return names
    out: list[str] = []
    for name in names:
        if "/" in name:
            out.append(name)
            continue
        out.extend(f"{ns}/{name}" for ns in namespaces)
    return out


def _apply_src_ns(ff: FlowFilter, namespaces: list[str]) -> None:
    if not ff.source_pod and not ff.source_service:
        ff.source_pod = [""]
    ff.source_pod = _add_namespaces(ff.source_pod, namespaces)
    ff.source_service = _add_namespaces(ff.source_service, namespaces)


def _apply_dest_ns(ff: FlowFilter, namespaces: list[str]) -> None:
    if not ff.destination_pod and not ff.destination_service:
        ff.destination_pod = [""]
    ff.destination_pod = _add_namespaces(ff.destination_pod, namespaces)
    ff.destination_service = _add_namespaces(ff.destination_service, namespaces)


_EITHER_SIDE: dict[str, tuple[str, str]] = {
    "pod": ("source_pod", "destination_pod"),
    "ip": ("source_ip", "destination_ip"),
    "label": ("source_label", "destination_label"),
    "service": ("source_service", "destination_service"),
    "port": ("source_port", "destination_port"),
    "workload": ("source_workload", "destination_workload"),
}

_ONE_FIELD: dict[str, str] = {
    "uuid": "uuid",
    "from-pod": "source_pod", "to-pod": "destination_pod",
    "from-ip": "source_ip", "to-ip": "destination_ip",
    "from-label": "source_label", "to-label": "destination_label",
    "from-service": "source_service", "to-service": "destination_service",
    "from-port": "source_port", "to-port": "destination_port",
    "from-workload": "source_workload", "to-workload": "destination_workload",
    "verdict": "verdict", "drop-reason-desc": "drop_reason_desc", "protocol": "protocol",
    "http-status": "http_status_code", "http-method": "http_method", "http-path": "http_path",
    "node-name": "node_name", "traffic-direction": "traffic_direction",
    "ip-version": "ip_version",
}


def _append(attr: str, value: object) -> Callable[[FlowFilter], None]:
    def update(ff: FlowFilter) -> None:
        getattr(ff, attr).append(value)

    return update


class FlagFilterBuilder:
    """Feed flags in command-line order with ``set(name, value)``, then read the lists."""

    def __init__(self) -> None:
        self._white = _Tracker()
        self._black = _Tracker()
        self._blacklisting = False

    def set(self, name: str, value: str = "") -> None:
        if name == "not":
            if self._blacklisting:
                raise FilterError("not", "consecutive --not statements")
            self._blacklisting = True
            return
        tracker = self._white
        if self._blacklisting:
            self._blacklisting = False
            tracker = self._black
        self._set(tracker, name, value)

    def _set(self, t: _Tracker, name: str, value: str) -> None:
        if name not in t.changed:
            t.changed.append(name)
        for group in _CONFLICTS:
            if name in group:
                for other in group:
                    if other != name and other in t.changed:
                        raise FilterError(name, f"filters --{name} and --{other} cannot be "
                                                f"combined")
        if name in _EITHER_SIDE:
            src, dst = _EITHER_SIDE[name]
            t.apply_left(_append(src, value))
            t.apply_right(_append(dst, value))
        elif name == "identity":
            number = parse_identity(value)
            t.apply_left(_append("source_identity", number))
            t.apply_right(_append("destination_identity", number))
        elif name in ("from-identity", "to-identity"):
            attr = "source_identity" if name == "from-identity" else "destination_identity"
            t.apply(_append(attr, parse_identity(value)))
        elif name in _ONE_FIELD:
            t.apply(_append(_ONE_FIELD[name], value))
        elif name == "type":
            t.apply(_append("event_type", parse_event_type(value)))
        elif name == "tcp-flags":
            t.apply(_append("tcp_flags", [f.strip().upper() for f in value.split(",")]))
        elif name in ("ipv4", "ipv6"):
            t.apply(_append("ip_version", "IPv4" if name == "ipv4" else "IPv6"))
        elif name == "namespace":
            t.ns.append(value)
        elif name == "from-namespace":
            t.src_ns.append(value)
        elif name == "to-namespace":
            t.dst_ns.append(value)
        else:
            raise FilterError(name, "unknown filter flag")
        for ff in (t.left, t.right):
            if ff is not None:
                _check_namespace_conflicts(t, ff)

    @property
    def whitelist(self) -> list[FlowFilter]:
        return self._white.filters()

    @property
    def blacklist(self) -> list[FlowFilter]:
        return self._black.filters()


def _check_namespace_conflicts(t: _Tracker, ff: FlowFilter) -> None:
    checks = ((t.ns, ff.source_pod), (t.ns, ff.destination_pod),
              (t.src_ns, ff.source_pod), (t.dst_ns, ff.destination_pod))
    for namespaces, names in checks:
        for ns in namespaces:
            for name in names:
                if "/" in name and name.split("/", 1)[0] != ns:
                    raise FilterError("namespace",
                                      f"namespace conflict: {ns!r} does not contain {name!r}")


def filters_from_flags(flags: Iterable[tuple[str, str]]) -> tuple[list[FlowFilter],
                                                                  list[FlowFilter]]:
    """(whitelist, blacklist) for flags given in command-line order, ``("not", "")`` included."""
    builder = FlagFilterBuilder()
    for name, value in flags:
        builder.set(name, value)
    return builder.whitelist, builder.blacklist

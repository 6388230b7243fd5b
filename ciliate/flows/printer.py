"""Hubble's text outputs: compact lines, the dict form and the aligned table.

Formats follow Hubble's printer: ``TIME [NODE]: SRC (ID) -> DST (ID) TYPE VERDICT (SUMMARY)``,
where TYPE is the trace point, the drop reason text or ``policy-verdict:MATCH DIRECTION``.
"""

from __future__ import annotations

from datetime import UTC, datetime

from ciliate.flows.jsonpb import summary
from ciliate.flows.model import Flow, LostEvent, Wire, is_lost
from ciliate.flows.tables import (
    TRACE_POINT_NAMES,
    IPProto,
    L7FlowType,
    LostEventSource,
    MessageType,
    TrafficDirection,
    Verdict,
    drop_reason_text,
    policy_match_text,
)
from ciliate.labels.reserved import ReservedIdentity

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def stamp_milli(time_ns: int) -> str:
    """Go's ``time.StampMilli`` in UTC: ``Nov 23 10:00:00.123`` (day padded with a space)."""
    if time_ns <= 0:
        return "N/A"
    seconds, nanos = divmod(time_ns, 1_000_000_000)
    t = datetime.fromtimestamp(seconds, tz=UTC)
    return (f"{_MONTHS[t.month - 1]} {t.day:>2} {t.hour:02d}:{t.minute:02d}:{t.second:02d}"
            f".{nanos // 1_000_000:03d}")


def _join_host_port(host: str, port: int) -> str:
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def _ports(f: Flow) -> tuple[int, int]:
    if f.protocol in (IPProto.TCP, IPProto.UDP, IPProto.SCTP):
        return f.source_port, f.destination_port
    return 0, 0


def _hostname(ip: str, port: int, ns: str, pod: str, svc: str, names: list[str]) -> str:
    host = ip
    if pod:
        host = f"{ns}/{pod}" if ns else pod
    elif svc:
        host = f"{ns}/{svc}" if ns else svc
    elif names:
        host = ",".join(names)
    return _join_host_port(host, port) if port else host


def host_names(f: Flow) -> tuple[str, str]:
    """Source and destination as Hubble prints them: ``ns/pod:port``, else ``ip:port``."""
    if not (f.source_ip or f.destination_ip):
        return f.source_mac, f.destination_mac
    sport, dport = _ports(f)
    s_ns, d_ns = f.source.namespace, f.destination.namespace
    s_svc = d_svc = ""
    if f.source_service:
        s_ns, s_svc = f.source_service.namespace, f.source_service.name
    if f.destination_service:
        d_ns, d_svc = f.destination_service.namespace, f.destination_service.name
    return (
        _hostname(f.source_ip, sport, s_ns, f.source.pod_name, s_svc, f.source_names),
        _hostname(f.destination_ip, dport, d_ns, f.destination.pod_name, d_svc,
                  f.destination_names),
    )


def identity_text(identity: int) -> str:
    """``(ID:1234)``, or the reserved name for reserved identities (``(world)``)."""
    if 0 < identity < 256:
        try:
            return f"({ReservedIdentity(identity).label_name})"
        except ValueError:
            pass
    return f"(ID:{identity})"


def flow_type_text(f: Flow) -> str:
    """Hubble's TYPE column (GetFlowType)."""
    if f.l7 is not None:
        proto = "http" if f.l7.http else "dns" if f.l7.dns else "l7"
        try:
            kind = L7FlowType(f.l7.type).name.lower()
        except ValueError:
            kind = str(f.l7.type)
        if f.l7.dns is not None:
            kind += " " + f.l7.dns.observation_source
        return f"{proto}-{kind}"
    if f.event_type == MessageType.TRACE:
        return TRACE_POINT_NAMES.get(f.event_sub_type, str(f.event_sub_type))
    if f.event_type == MessageType.DROP:
        return drop_reason_text(f.event_sub_type or f.drop_reason)
    if f.event_type == MessageType.POLICY_VERDICT:
        try:
            direction = TrafficDirection(f.traffic_direction).name
        except ValueError:
            direction = str(f.traffic_direction)
        return f"policy-verdict:{policy_match_text(f.policy_match_type)} {direction}"
    return "UNKNOWN"


def verdict_text(f: Flow) -> str:
    """The VERDICT column; policy-verdict events say ALLOWED/DENIED/AUDITED as Hubble's."""
    try:
        name = Verdict(f.verdict).name
    except ValueError:
        return str(f.verdict)
    policy = f.event_type == MessageType.POLICY_VERDICT
    if policy and f.verdict in (Verdict.FORWARDED, Verdict.REDIRECTED):
        return "ALLOWED"
    if policy and f.verdict in (Verdict.DROPPED, Verdict.ERROR):
        return "DENIED"
    if policy and f.verdict == Verdict.AUDIT:
        return "AUDITED"
    return name


def compact(f: Flow, *, node_name: bool = False) -> str:
    """One compact line (no newline), as ``hubble observe -o compact``."""
    src, dst = host_names(f)
    src_id, dst_id = identity_text(f.source.identity), identity_text(f.destination.identity)
    arrow = "->"
    if f.is_reply is None:
        arrow = "<>"
    elif f.is_reply:
        src, dst, src_id, dst_id, arrow = dst, src, dst_id, src_id, "<-"
    node = f" [{f.node_name}]" if node_name else ""
    return (f"{stamp_milli(f.time_ns)}{node}: {src} {src_id} {arrow} {dst} {dst_id} "
            f"{flow_type_text(f)} {verdict_text(f)} ({summary(f)})")


def compact_lost(e: LostEvent) -> str:
    try:
        source = LostEventSource(e.source).name
    except ValueError:
        source = str(e.source)
    return f"EVENTS LOST: {source} CPU({e.cpu or 0}) {e.num_events_lost}"


def compact_record(w: Wire, *, node_name: bool = False) -> str:
    """Compact text for any wire record (flow or lost event)."""
    if is_lost(w):
        return compact_lost(LostEvent.from_wire(w))
    return compact(Flow.from_wire(w), node_name=node_name)


def dict_block(f: Flow, *, first: bool, node_name: bool = False) -> str:
    """The ``-o dict`` block for one flow, with the separator line before all but the first."""
    src, dst = host_names(f)
    lines = [] if first else ["------------"]
    lines.append(f"  TIMESTAMP: {stamp_milli(f.time_ns)}")
    if node_name:
        lines.append(f"       NODE: {f.node_name}")
    lines += [
        f"     SOURCE: {src}",
        f"DESTINATION: {dst}",
        f"       TYPE: {flow_type_text(f)}",
        f"    VERDICT: {verdict_text(f)}",
        f"    SUMMARY: {summary(f)}",
    ]
    return "\n".join(lines)


TABLE_HEADER = ("TIMESTAMP", "SOURCE", "DESTINATION", "TYPE", "VERDICT", "SUMMARY")


def table_row(f: Flow, *, node_name: bool = False) -> list[str]:
    src, dst = host_names(f)
    row = [stamp_milli(f.time_ns)]
    if node_name:
        row.append(f.node_name)
    return [*row, src, dst, flow_type_text(f), verdict_text(f), summary(f)]


def table(flows: list[Flow], *, node_name: bool = False) -> str:
    """The ``-o table`` text: Go tabwriter alignment (padding 3), a header line first."""
    header = list(TABLE_HEADER)
    if node_name:
        header.insert(1, "NODE")
    rows = [header] + [table_row(f, node_name=node_name) for f in flows]
    return align(rows)


def align(rows: list[list[str]], padding: int = 3) -> str:
    """Left-align all but the last column, as text/tabwriter does (the last cell is unpadded)."""
    if not rows:
        return ""
    columns = max(len(r) for r in rows)
    widths = [0] * columns
    for r in rows:
        for i, cell in enumerate(r[:-1]):
            widths[i] = max(widths[i], len(cell) + padding)
    out = []
    for r in rows:
        cells = [cell.ljust(widths[i]) for i, cell in enumerate(r[:-1])]
        out.append("".join(cells) + (r[-1] if r else ""))
    return "\n".join(out)

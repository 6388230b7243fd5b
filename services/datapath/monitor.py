"""``ciliate monitor``: the datapath's raw event stream, printed as ``cilium-dbg monitor`` does.

The agents publish flow records on ``flows.<node>`` (the ``BatchPublisher`` envelope
``{"source", "items", "lost", "lt"}`` with a per-batch label table, or a bare array;
docs/events.md). Everything here but
:func:`follow` is pure: a wire dict in, a line (or a Cilium-shaped JSON object) out.

Fields the wire does not carry print as Cilium prints an unknown: ``flow 0x...`` is a CRC-32 of
the 5-tuple (so the lines of one connection share it), ``orig-ip`` is the source address (this
datapath does no reverse NAT), ``ifindex`` is the record's interface when the producer set one,
else 0. A trace's ``state`` is the conntrack state the datapath recorded (the flow's
``trace_reason``), named as Cilium's monitor names it; a record without one says ``unknown``.
"""

from __future__ import annotations

import asyncio
import json
import zlib
from collections.abc import Callable, Iterable, Mapping
from enum import StrEnum
from typing import Any

from ciliate.bus import subjects
from ciliate.flows.codec import TABLE, resolve_tables
from ciliate.flows.model import Wire, is_lost
from ciliate.flows.tables import (
    ICMPV4_TYPE_NAMES,
    L7FlowType,
    MessageType,
    TCPFlag,
    TraceObservationPoint,
    TraceReason,
    TrafficDirection,
    Verdict,
    drop_reason_text,
    policy_match_text,
)
from ciliate.labels import ReservedIdentity

RESERVED_MAX = 255


class MonitorType(StrEnum):
    """``--type`` values, named as cilium monitor's."""

    DROP = "drop"
    TRACE = "trace"
    POLICY_VERDICT = "policy-verdict"
    L7 = "l7"


MESSAGE_TYPES: dict[int, MonitorType] = {
    MessageType.DROP: MonitorType.DROP,
    MessageType.TRACE: MonitorType.TRACE,
    MessageType.POLICY_VERDICT: MonitorType.POLICY_VERDICT,
    MessageType.ACCESS_LOG: MonitorType.L7,
}

TCP_SUMMARY_FLAGS: tuple[TCPFlag, ...] = (TCPFlag.SYN, TCPFlag.ACK, TCPFlag.RST, TCPFlag.FIN)
"""Flags in Cilium's connection summary (``tcp SYN, ACK``), in its order."""

L4_NAMES: dict[int, str] = {6: "tcp", 17: "udp", 132: "sctp"}

L7_VERDICTS: dict[int, str] = {Verdict.FORWARDED: "Forwarded", Verdict.DROPPED: "Denied"}

TO_POINTS = frozenset({TraceObservationPoint.TO_ENDPOINT})
FROM_POINTS = frozenset({TraceObservationPoint.FROM_ENDPOINT})


def monitor_type(w: Mapping[str, Any]) -> MonitorType | None:
    """Which ``--type`` a record belongs to (None for lost records and unknown kinds)."""
    if is_lost(dict(w)):
        return None
    return MESSAGE_TYPES.get(int(w.get("et", 0)))


def identity_name(identity: int, *, numeric: bool = False) -> str:
    """Cilium's NumericIdentity.String(): reserved identities by name unless ``numeric``."""
    if not numeric and 0 < identity <= RESERVED_MAX:
        try:
            return ReservedIdentity(identity).label_name
        except ValueError:
            pass
    return str(identity)


def flow_hash(w: Mapping[str, Any]) -> int:
    """A stable 32-bit id of the connection's 5-tuple in this direction."""
    key = f"{w.get('sip', '')}:{w.get('sp', 0)}>{w.get('dip', '')}:{w.get('dp', 0)}/{w.get('p', 0)}"
    return zlib.crc32(key.encode())


def _host_port(ip: str, port: int) -> str:
    host = f"[{ip}]" if ":" in ip else ip
    return f"{host}:{port}"


def connection_summary(w: Mapping[str, Any]) -> str:
    """``10.0.0.1:40000 -> 10.0.0.2:80 tcp SYN, ACK`` (GetConnectionSummary)."""
    sip, dip, proto = str(w.get("sip", "")), str(w.get("dip", "")), int(w.get("p", 0))
    if proto in (1, 58):
        names = ICMPV4_TYPE_NAMES if proto == 1 else {}
        icmp = int(w.get("it", 0))
        return f"{sip} -> {dip} {names.get(icmp, f'type {icmp}')}"
    l4 = L4_NAMES.get(proto)
    if l4 is None:
        return f"{sip} -> {dip} proto {proto}" if proto else f"{sip} -> {dip}"
    text = f"{_host_port(sip, int(w.get('sp', 0)))} -> {_host_port(dip, int(w.get('dp', 0)))} {l4}"
    if proto == 6:
        bits = int(w.get("tf", 0))
        flags = [str(f.name) for f in TCP_SUMMARY_FLAGS if bits & f]
        if flags:
            text += " " + ", ".join(flags)
    return text


def _ifindex(w: Mapping[str, Any]) -> str:
    iface = w.get("if")
    if isinstance(iface, (list, tuple)) and len(iface) == 2:
        return str(iface[1] or iface[0])
    return "0"


TRACE_STATE_NAMES: dict[int, str] = {
    TraceReason.NEW: "new", TraceReason.ESTABLISHED: "established", TraceReason.REPLY: "reply",
    TraceReason.RELATED: "related", TraceReason.REOPENED: "reopened"}
"""``cilium-dbg monitor``'s connection states (its ``connState``)."""


def trace_state(w: Mapping[str, Any]) -> str:
    return TRACE_STATE_NAMES.get(int(w.get("tr", 0)), "unknown")


def _identities(w: Mapping[str, Any], numeric: bool) -> str:
    return (f"identity {identity_name(int(w.get('si', 0)), numeric=numeric)}->"
            f"{identity_name(int(w.get('di', 0)), numeric=numeric)}")


def _local_endpoint(w: Mapping[str, Any]) -> int:
    """The endpoint on whose veth the event happened: destination for ingress, else source."""
    if int(w.get("td", 0)) == TrafficDirection.INGRESS:
        return int(w.get("did", 0))
    return int(w.get("sid", 0))


def _trace_summary(w: Mapping[str, Any]) -> str:
    point = int(w.get("op", 0))
    if point in TO_POINTS:
        return f"-> endpoint {int(w.get('did', 0))}"
    if point in FROM_POINTS:
        return f"<- endpoint {int(w.get('sid', 0))}"
    try:
        name = TraceObservationPoint(point).name.lower().replace("_", "-")
    except ValueError:
        name = str(point)
    return f"-> {name}"


def _policy_action(w: Mapping[str, Any]) -> str:
    verdict = int(w.get("v", 0))
    if verdict == Verdict.AUDIT:
        return "audit"
    if verdict in (Verdict.DROPPED, Verdict.ERROR):
        return "deny"
    if verdict == Verdict.REDIRECTED or int(w.get("pp", 0)):
        return "redirect"
    return "allow"


def _labels(w: Mapping[str, Any], prefix: str) -> str:
    return "[" + " ".join(str(lb) for lb in w.get(prefix + "l", ())) + "]"


def _l7_line(w: Mapping[str, Any], numeric: bool) -> str:
    l7 = w.get("l7") or {}
    kind = "Response" if int(l7.get("ty", 0)) == L7FlowType.RESPONSE else "Request"
    arrow = "<-" if int(w.get("td", 0)) == TrafficDirection.INGRESS else "->"
    proto = "http" if "http" in l7 else "dns" if "dns" in l7 else "l7"
    verdict = L7_VERDICTS.get(int(w.get("v", 0)), "Unknown")
    line = (f"{arrow} {kind} {proto} from {int(w.get('sid', 0))} ({_labels(w, 's')}) to "
            f"{int(w.get('did', 0))} ({_labels(w, 'd')}), {_identities(w, numeric)}, "
            f"verdict {verdict}")
    http = l7.get("http")
    if isinstance(http, Mapping):
        line += f" {http.get('method', '')} {http.get('url', '')} => {int(http.get('code', 0))}"
    dns = l7.get("dns")
    if isinstance(dns, Mapping):
        line += f" DNS Query: {dns.get('query', '')}"
        if dns.get("ips"):
            line += " Answer: " + ",".join(f"'{ip}'" for ip in dns["ips"])
    return line


def format_line(w: Mapping[str, Any], *, numeric: bool = False) -> str:
    """One record as cilium monitor's one-line summary (``DumpInfo``)."""
    if is_lost(dict(w)):
        return f"Lost {int(w.get('ln', 0))} events (node {w.get('n', '')})"
    kind = monitor_type(w)
    mark = f"{flow_hash(w):#x}"
    conn = connection_summary(w)
    if kind is MonitorType.DROP:
        reason = int(w.get("dr", 0)) or int(w.get("es", 0))
        return (f"xx drop ({drop_reason_text(reason)}) flow {mark} to endpoint "
                f"{int(w.get('did', 0))}, ifindex {_ifindex(w)}, {_identities(w, numeric)}: "
                f"{conn}")
    if kind is MonitorType.POLICY_VERDICT:
        direction = "ingress" if int(w.get("td", 0)) == TrafficDirection.INGRESS else "egress"
        remote = int(w.get("si" if direction == "ingress" else "di", 0))
        return (f"Policy verdict log: flow {mark} local EP ID {_local_endpoint(w)}, remote ID "
                f"{identity_name(remote, numeric=numeric)}, proto {int(w.get('p', 0))}, "
                f"{direction}, action {_policy_action(w)}, auth: disabled, match "
                f"{policy_match_text(int(w.get('pm', 0)))}, {conn}")
    if kind is MonitorType.TRACE:
        return (f"{_trace_summary(w)} flow {mark} {_identities(w, numeric)} state "
                f"{trace_state(w)} ifindex {_ifindex(w)} orig-ip {w.get('sip', '')}: {conn}")
    if kind is MonitorType.L7:
        return _l7_line(w, numeric)
    return f">> event type {int(w.get('et', 0))}: {conn}"


def _summary(w: Mapping[str, Any]) -> dict[str, Any]:
    """Cilium's DissectSummary (l3/l4 addresses and the one-line text)."""
    out: dict[str, Any] = {"l3": {"src": w.get("sip", ""), "dst": w.get("dip", "")}}
    if int(w.get("p", 0)) in L4_NAMES:
        out["l4"] = {"src": str(int(w.get("sp", 0))), "dst": str(int(w.get("dp", 0)))}
    out["proto"] = int(w.get("p", 0))
    out["summary"] = connection_summary(w)
    return out


def to_json(w: Mapping[str, Any]) -> dict[str, Any]:
    """cilium monitor ``-j``'s objects (TraceNotifyVerbose, DropNotifyVerbose, ...)."""
    if is_lost(dict(w)):
        return {"type": "lost", "lost": int(w.get("ln", 0)), "node": w.get("n", "")}
    kind = monitor_type(w)
    base: dict[str, Any] = {"type": str(kind) if kind else "unknown",
                            "mark": f"{flow_hash(w):#x}", "node": w.get("n", ""),
                            "srcLabel": int(w.get("si", 0)), "dstLabel": int(w.get("di", 0)),
                            "summary": _summary(w)}
    if kind is MonitorType.DROP:
        reason = int(w.get("dr", 0)) or int(w.get("es", 0))
        base.update(reason=drop_reason_text(reason), dstID=int(w.get("did", 0)),
                    ifindex=_ifindex(w))
    elif kind is MonitorType.TRACE:
        base.update(state=trace_state(w), traceSummary=_trace_summary(w),
                    source=int(w.get("sid", 0)), dstID=int(w.get("did", 0)),
                    ifindex=_ifindex(w))
    elif kind is MonitorType.POLICY_VERDICT:
        ingress = int(w.get("td", 0)) == TrafficDirection.INGRESS
        base.update(source=_local_endpoint(w), action=_policy_action(w),
                    direction="ingress" if ingress else "egress",
                    match=policy_match_text(int(w.get("pm", 0))),
                    remoteLabel=int(w.get("si" if ingress else "di", 0)))
    elif kind is MonitorType.L7:
        base["l7"] = w.get("l7") or {}
    return base


def batch_records(payload: Any) -> list[Wire]:
    """Records of one ``flows.*`` message: the BatchPublisher envelope (its label table ``lt``
    resolved; its ``lost`` count as a lost record first, as the events service does) or a
    bare array. An envelope whose label table does not resolve yields only its lost count."""
    if isinstance(payload, Mapping) and "items" in payload:
        items = [r for r in payload.get("items") or () if isinstance(r, dict)]
        if payload.get(TABLE) is not None:
            try:
                resolve_tables(items, payload[TABLE])
            except ValueError:
                items = []
        lost = int(payload.get("lost", 0) or 0)
        if lost > 0:
            items.insert(0, {"k": "lost", "ln": lost, "n": str(payload.get("source", ""))})
        return items
    if isinstance(payload, list):
        return [r for r in payload if isinstance(r, dict)]
    if isinstance(payload, dict):
        return [payload]
    return []


def wanted(w: Mapping[str, Any], types: Iterable[MonitorType], related_to: Iterable[int] = (),
           ) -> bool:
    """``--type`` (any of, empty = all; lost records always pass) and ``--related-to``."""
    kinds = set(types)
    if is_lost(dict(w)):
        return True
    if kinds and monitor_type(w) not in kinds:
        return False
    eps = set(related_to)
    return not eps or bool({int(w.get("sid", 0)), int(w.get("did", 0))} & eps)


def render(w: Mapping[str, Any], *, output: str, numeric: bool = False) -> str:
    if output == "json":
        return json.dumps(to_json(w), separators=(",", ":"))
    return format_line(w, numeric=numeric)


async def follow(
    bus: Any, emit: Callable[[str], None], *, nodes: Iterable[str] = (),
    types: Iterable[MonitorType] = (), related_to: Iterable[int] = (), output: str = "text",
    numeric: bool = False, max_events: int = 0,
) -> int:
    """Print matching records from ``flows.*`` (or the given nodes) until cancelled or
    ``max_events`` lines were printed; returns how many were printed."""
    kinds, eps = list(types), list(related_to)
    done = asyncio.Event()
    printed = 0

    async def on_batch(payload: Any) -> None:
        nonlocal printed
        for w in batch_records(payload):
            if done.is_set():
                return
            if wanted(w, kinds, eps):
                emit(render(w, output=output, numeric=numeric))
                printed += 1
                if max_events and printed >= max_events:
                    done.set()

    subject_list = [subjects.flows(n) for n in nodes] or [subjects.FLOWS_ALL]
    subs = [await bus.subscribe(s, on_batch) for s in subject_list]
    await bus.nc.flush()
    try:
        await done.wait()
    finally:
        for sub in subs:
            await sub.unsubscribe()
    return printed

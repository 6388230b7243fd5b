"""Sans-io decoding of the ring buffer's event records into plain Hubble-ish flow dicts.

The record layout is defined here once (``EVENT``); the C struct ``flow_event`` in
``bpf/datapath.c`` must match it field for field (a privileged test checks the size).
"""

from __future__ import annotations

import ipaddress
import struct
from socket import inet_ntoa
from typing import Any

from ciliate.flows.tables import (
    DropReason,
    MessageType,
    PolicyMatchType,
    TraceReason,
    TrafficDirection,
    Verdict,
    drop_reason_name,
    tcp_flag_names,
)

EVENT = struct.Struct("<QII4s4sHHIIIBBBBBBBB")
"""ts_ns, src_identity, dst_identity, saddr, daddr, sport, dport, ifindex, len, endpoint_id,
type, verdict, drop_reason, direction, proto, tcp_flags, trace_reason, match_type.

``trace_reason`` is the connection's conntrack state (``TraceReason``: new, established, reply,
related, reopened; 0 when unknown, as for drops); a record is a reply iff it says REPLY."""

EVENT_SIZE = EVENT.size

PROTO_NAMES = {1: "ICMPv4", 6: "TCP", 17: "UDP", 132: "SCTP"}


class DecodeError(ValueError):
    pass


def _names(enum: Any, size: int = 256) -> tuple[Any, ...]:
    """Name per byte value (the value itself when the enum has no member)."""
    return tuple(enum(v).name if v in enum._value2member_map_ else v for v in range(size))


_TYPE = _names(MessageType)
_VERDICT = _names(Verdict)
_MATCH = _names(PolicyMatchType)
_TRACE_REASON = _names(TraceReason)
_DIRECTION = tuple(TrafficDirection(v).name if v in TrafficDirection._value2member_map_
                   else "TRAFFIC_DIRECTION_UNKNOWN" for v in range(256))
_DROP_DESC = ("", *(drop_reason_name(v) for v in range(1, 256)))
_TCP_FLAGS = tuple(tuple(tcp_flag_names(v)) for v in range(256))
_PROTO = tuple(PROTO_NAMES.get(v, str(v)) for v in range(256))


def _flow(row: tuple[Any, ...]) -> dict[str, Any]:
    (ts, src_id, dst_id, saddr, daddr, sport, dport, ifindex, length, ep_id,
     etype, verdict, reason, direction, proto, tcp_flags, trace_reason, match) = row
    return {
        "ts_ns": ts,
        "type": _TYPE[etype],
        "verdict": _VERDICT[verdict],
        "drop_reason": reason,
        "drop_reason_desc": _DROP_DESC[reason],
        "src_ip": inet_ntoa(saddr),
        "dst_ip": inet_ntoa(daddr),
        "src_port": sport,
        "dst_port": dport,
        "proto": _PROTO[proto],
        "tcp_flags": list(_TCP_FLAGS[tcp_flags]) if proto == 6 else [],
        "traffic_direction": _DIRECTION[direction],
        "src_identity": src_id,
        "dst_identity": dst_id,
        "trace_reason": _TRACE_REASON[trace_reason],
        "is_reply": trace_reason == TraceReason.REPLY,
        "ifindex": ifindex,
        "length": length,
        "endpoint_id": ep_id,
        "policy_match_type": _MATCH[match],
    }


def decode_event(data: bytes) -> dict[str, Any]:
    """One record -> a flat flow dict (verdict/drop reason as Hubble's enum names)."""
    if len(data) < EVENT_SIZE:
        raise DecodeError(f"event record of {len(data)} bytes, want {EVENT_SIZE}")
    return _flow(EVENT.unpack_from(data))


def decode_batch(records: bytes) -> list[dict[str, Any]]:
    """Back-to-back records (a multiple of ``EVENT_SIZE``) -> flows, in one ``iter_unpack``."""
    if len(records) % EVENT_SIZE:
        raise DecodeError(f"{len(records)} bytes is not a whole number of records")
    return [_flow(row) for row in EVENT.iter_unpack(records)]


def encode_event(
    *, ts_ns: int = 0, src_identity: int = 0, dst_identity: int = 0, src_ip: str = "0.0.0.0",
    dst_ip: str = "0.0.0.0", src_port: int = 0, dst_port: int = 0, ifindex: int = 0,
    length: int = 0, endpoint_id: int = 0, type: MessageType = MessageType.DROP,
    verdict: Verdict = Verdict.DROPPED, drop_reason: int = DropReason.POLICY_DENIED,
    direction: TrafficDirection = TrafficDirection.INGRESS, proto: int = 6, tcp_flags: int = 0,
    is_reply: bool = False, match_type: int = 0, trace_reason: int | None = None,
) -> bytes:
    """The inverse of decode_event: what the BPF program writes (for tests and replay).
    ``is_reply`` alone stands for trace reason REPLY."""
    if trace_reason is None:
        trace_reason = TraceReason.REPLY if is_reply else TraceReason.TRACE_REASON_UNKNOWN
    return EVENT.pack(
        ts_ns, src_identity, dst_identity, ipaddress.IPv4Address(src_ip).packed,
        ipaddress.IPv4Address(dst_ip).packed, src_port, dst_port, ifindex, length, endpoint_id,
        type, verdict, drop_reason, direction, proto, tcp_flags, trace_reason, match_type,
    )


class EventDecoder:
    """Collects raw records as the ring buffer hands them over (the callback only copies
    bytes) and decodes them in one batch on ``drain``; short records are counted as errors."""

    def __init__(self) -> None:
        self.records: list[bytes] = []
        self.errors = 0

    def feed(self, data: bytes) -> None:
        if len(data) >= EVENT_SIZE:
            self.records.append(data[:EVENT_SIZE] if len(data) > EVENT_SIZE else data)
        else:
            self.errors += 1

    def drain(self) -> list[dict[str, Any]]:
        records, self.records = self.records, []
        return decode_batch(b"".join(records)) if records else []

"""Sans-io decoding of the ring buffer's event records into plain Hubble-ish flow dicts.

The record layout is defined here once (``EVENT``); the C struct ``flow_event`` in
``bpf/datapath.c`` must match it field for field (a privileged test checks the size).
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Any

from ciliate.flows.tables import (
    DropReason,
    MessageType,
    PolicyMatchType,
    TrafficDirection,
    Verdict,
    drop_reason_name,
    tcp_flag_names,
)

EVENT = struct.Struct("<QII4s4sHHIIIBBBBBBBB")
"""ts_ns, src_identity, dst_identity, saddr, daddr, sport, dport, ifindex, len, endpoint_id,
type, verdict, drop_reason, direction, proto, tcp_flags, is_reply, match_type."""

EVENT_SIZE = EVENT.size

PROTO_NAMES = {1: "ICMPv4", 6: "TCP", 17: "UDP", 132: "SCTP"}


class DecodeError(ValueError):
    pass


def decode_event(data: bytes) -> dict[str, Any]:
    """One record -> a flat flow dict (verdict/drop reason as Hubble's enum names)."""
    if len(data) < EVENT_SIZE:
        raise DecodeError(f"event record of {len(data)} bytes, want {EVENT_SIZE}")
    (ts, src_id, dst_id, saddr, daddr, sport, dport, ifindex, length, ep_id,
     etype, verdict, reason, direction, proto, tcp_flags, is_reply, match) = EVENT.unpack_from(data)
    flow: dict[str, Any] = {
        "ts_ns": ts,
        "type": MessageType(etype).name if etype in MessageType._value2member_map_ else etype,
        "verdict": Verdict(verdict).name if verdict in Verdict._value2member_map_ else verdict,
        "drop_reason": reason,
        "drop_reason_desc": drop_reason_name(reason) if reason else "",
        "src_ip": str(ipaddress.IPv4Address(saddr)),
        "dst_ip": str(ipaddress.IPv4Address(daddr)),
        "src_port": sport,
        "dst_port": dport,
        "proto": PROTO_NAMES.get(proto, str(proto)),
        "tcp_flags": tcp_flag_names(tcp_flags) if proto == 6 else [],
        "traffic_direction": TrafficDirection(direction).name
        if direction in TrafficDirection._value2member_map_ else "TRAFFIC_DIRECTION_UNKNOWN",
        "src_identity": src_id,
        "dst_identity": dst_id,
        "is_reply": bool(is_reply),
        "ifindex": ifindex,
        "length": length,
        "endpoint_id": ep_id,
        "policy_match_type": PolicyMatchType(match).name
        if match in PolicyMatchType._value2member_map_ else match,
    }
    return flow


def encode_event(
    *, ts_ns: int = 0, src_identity: int = 0, dst_identity: int = 0, src_ip: str = "0.0.0.0",
    dst_ip: str = "0.0.0.0", src_port: int = 0, dst_port: int = 0, ifindex: int = 0,
    length: int = 0, endpoint_id: int = 0, type: MessageType = MessageType.DROP,
    verdict: Verdict = Verdict.DROPPED, drop_reason: int = DropReason.POLICY_DENIED,
    direction: TrafficDirection = TrafficDirection.INGRESS, proto: int = 6, tcp_flags: int = 0,
    is_reply: bool = False, match_type: int = 0,
) -> bytes:
    """The inverse of decode_event: what the BPF program writes (for tests and replay)."""
    return EVENT.pack(
        ts_ns, src_identity, dst_identity, ipaddress.IPv4Address(src_ip).packed,
        ipaddress.IPv4Address(dst_ip).packed, src_port, dst_port, ifindex, length, endpoint_id,
        type, verdict, drop_reason, direction, proto, tcp_flags, int(is_reply), match_type,
    )


class EventDecoder:
    """Feed raw records as they arrive; collects flows and counts undecodable ones as lost."""

    def __init__(self) -> None:
        self.flows: list[dict[str, Any]] = []
        self.errors = 0

    def feed(self, data: bytes) -> None:
        try:
            self.flows.append(decode_event(data))
        except DecodeError:
            self.errors += 1

    def drain(self) -> list[dict[str, Any]]:
        out, self.flows = self.flows, []
        return out

"""Hubble's and Cilium's enumerations, defined once, with the numbers the wire carries.

The numbers are those of Hubble's ``flow.proto`` and Cilium's ``pkg/monitor/api`` so a flow
produced by our datapath reads exactly like one from Cilium: JSON carries the enum names,
compact output the readable texts.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag


class Verdict(IntEnum):
    """flow.Verdict."""

    VERDICT_UNKNOWN = 0
    FORWARDED = 1
    DROPPED = 2
    ERROR = 3
    AUDIT = 4
    REDIRECTED = 5
    TRACED = 6
    TRANSLATED = 7


class DropReason(IntEnum):
    """flow.DropReason: Cilium's drop codes (bpf/lib/common.h) with the proto enum names."""

    DROP_REASON_UNKNOWN = 0
    INVALID_SOURCE_MAC = 130
    INVALID_DESTINATION_MAC = 131
    INVALID_SOURCE_IP = 132
    POLICY_DENIED = 133
    INVALID_PACKET_DROPPED = 134
    CT_TRUNCATED_OR_INVALID_HEADER = 135
    CT_MISSING_TCP_ACK_FLAG = 136
    CT_UNKNOWN_L4_PROTOCOL = 137
    CT_CANNOT_CREATE_ENTRY_FROM_PACKET = 138
    UNSUPPORTED_L3_PROTOCOL = 139
    MISSED_TAIL_CALL = 140
    ERROR_WRITING_TO_PACKET = 141
    UNKNOWN_L4_PROTOCOL = 142
    UNKNOWN_ICMPV4_CODE = 143
    UNKNOWN_ICMPV4_TYPE = 144
    UNKNOWN_ICMPV6_CODE = 145
    UNKNOWN_ICMPV6_TYPE = 146
    ERROR_RETRIEVING_TUNNEL_KEY = 147
    ERROR_RETRIEVING_TUNNEL_OPTIONS = 148
    INVALID_GENEVE_OPTION = 149
    UNKNOWN_L3_TARGET_ADDRESS = 150
    STALE_OR_UNROUTABLE_IP = 151
    NO_MATCHING_LOCAL_CONTAINER_FOUND = 152
    ERROR_WHILE_CORRECTING_L3_CHECKSUM = 153
    ERROR_WHILE_CORRECTING_L4_CHECKSUM = 154
    CT_MAP_INSERTION_FAILED = 155
    INVALID_IPV6_EXTENSION_HEADER = 156
    IP_FRAGMENTATION_NOT_SUPPORTED = 157
    SERVICE_BACKEND_NOT_FOUND = 158
    NO_TUNNEL_OR_ENCAPSULATION_ENDPOINT = 160
    FAILED_TO_INSERT_INTO_PROXYMAP = 161
    REACHED_EDT_RATE_LIMITING_DROP_HORIZON = 162
    UNKNOWN_CONNECTION_TRACKING_STATE = 163
    LOCAL_HOST_IS_UNREACHABLE = 164
    NO_CONFIGURATION_AVAILABLE_TO_PERFORM_POLICY_DECISION = 165
    UNSUPPORTED_L2_PROTOCOL = 166
    NO_MAPPING_FOR_NAT_MASQUERADE = 167
    UNSUPPORTED_PROTOCOL_FOR_NAT_MASQUERADE = 168
    FIB_LOOKUP_FAILED = 169
    ENCAPSULATION_TRAFFIC_IS_PROHIBITED = 170
    INVALID_IDENTITY = 171
    UNKNOWN_SENDER = 172
    NAT_NOT_NEEDED = 173
    IS_A_CLUSTERIP = 174
    FIRST_LOGICAL_DATAGRAM_FRAGMENT_NOT_FOUND = 175
    FORBIDDEN_ICMPV6_MESSAGE = 176
    DENIED_BY_LB_SRC_RANGE_CHECK = 177
    SOCKET_LOOKUP_FAILED = 178
    SOCKET_ASSIGN_FAILED = 179
    PROXY_REDIRECTION_NOT_SUPPORTED_FOR_PROTOCOL = 180
    POLICY_DENY = 181
    VLAN_FILTERED = 182
    INVALID_VNI = 183
    INVALID_TC_BUFFER = 184
    NO_SID = 185
    MISSING_SRV6_STATE = 186
    NAT46 = 187
    NAT64 = 188
    AUTH_REQUIRED = 189
    CT_NO_MAP_FOUND = 190
    SNAT_NO_MAP_FOUND = 191
    INVALID_CLUSTER_ID = 192
    UNSUPPORTED_PROTOCOL_FOR_DSR_ENCAP = 193
    NO_EGRESS_GATEWAY = 194
    TTL_EXCEEDED = 196
    NO_NODE_ID = 197
    DROP_HOST_NOT_READY = 202
    DROP_EP_NOT_READY = 203


DROP_REASON_TEXT: dict[int, str] = {
    130: "Invalid source mac",
    131: "Invalid destination mac",
    132: "Invalid source ip",
    133: "Policy denied",
    134: "Invalid packet",
    135: "CT: Truncated or invalid header",
    136: "Fragmentation needed",
    137: "CT: Unknown L4 protocol",
    138: "CT: Can't create entry from packet",
    139: "Unsupported L3 protocol",
    140: "Missed tail call",
    141: "Error writing to packet",
    142: "Unknown L4 protocol",
    143: "Unknown ICMPv4 code",
    144: "Unknown ICMPv4 type",
    145: "Unknown ICMPv6 code",
    146: "Unknown ICMPv6 type",
    147: "Error retrieving tunnel key",
    148: "Error retrieving tunnel options",
    149: "Invalid Geneve option",
    150: "Unknown L3 target address",
    151: "Stale or unroutable IP",
    152: "No matching local container found",
    153: "Error while correcting L3 checksum",
    154: "Error while correcting L4 checksum",
    155: "CT: Map insertion failed",
    156: "Invalid IPv6 extension header",
    157: "IP fragmentation not supported",
    158: "Service backend not found",
    160: "No tunnel/encapsulation endpoint (datapath BUG!)",
    161: "NAT 46/64 not enabled",
    162: "Reached EDT rate-limiting drop horizon",
    163: "Unknown connection tracking state",
    164: "Local host is unreachable",
    165: "No configuration available to perform policy decision",
    166: "Unsupported L2 protocol",
    167: "No mapping for NAT masquerade",
    168: "Unsupported protocol for NAT masquerade",
    169: "FIB lookup failed",
    170: "Encapsulation traffic is prohibited",
    171: "Invalid identity",
    172: "Unknown sender",
    173: "NAT not needed",
    174: "Is a ClusterIP",
    175: "First logical datagram fragment not found",
    176: "Forbidden ICMPv6 message",
    177: "Denied by LB src range check",
    178: "Socket lookup failed",
    179: "Socket assign failed",
    180: "Proxy redirection not supported for protocol",
    181: "Policy denied by denylist",
    182: "VLAN traffic disallowed by VLAN filter",
    183: "Incorrect VNI from VTEP",
    184: "Failed to update or lookup TC buffer",
    185: "No SID was found for the IP address",
    186: "SRv6 state was removed during tail call",
    187: "L3 translation from IPv4 to IPv6 failed (NAT46)",
    188: "L3 translation from IPv6 to IPv4 failed (NAT64)",
    189: "Authentication required",
    190: "No conntrack map found",
    191: "No nat map found",
    192: "Invalid ClusterID",
    193: "Unsupported packet protocol for DSR encapsulation",
    194: "No egress gateway found",
    196: "TTL exceeded",
    197: "No node ID found",
    202: "Host datapath not ready",
    203: "Endpoint policy program not available",
}
"""Cilium's readable drop texts (pkg/monitor/api/drop.go), shown by compact output and
used as the ``reason`` label of ``hubble_drop_total``."""


def drop_reason_text(code: int) -> str:
    """The readable text for a drop code; unknown codes print as their number, as Cilium's."""
    return DROP_REASON_TEXT.get(code, str(code))


def drop_reason_name(code: int) -> str:
    """The proto enum name for a drop code (``DROP_REASON_UNKNOWN`` for anything unlisted)."""
    try:
        return DropReason(code).name
    except ValueError:
        return DropReason.DROP_REASON_UNKNOWN.name


class TrafficDirection(IntEnum):
    TRAFFIC_DIRECTION_UNKNOWN = 0
    INGRESS = 1
    EGRESS = 2


class FlowType(IntEnum):
    UNKNOWN_TYPE = 0
    L3_L4 = 1
    L7 = 2
    SOCK = 3


class IPVersion(IntEnum):
    IP_NOT_USED = 0
    IPv4 = 1
    IPv6 = 2


class L7FlowType(IntEnum):
    UNKNOWN_L7_TYPE = 0
    REQUEST = 1
    RESPONSE = 2
    SAMPLE = 3


class TraceReason(IntEnum):
    """Why a trace event was emitted: the connection's state as conntrack saw it (flow.proto)."""

    TRACE_REASON_UNKNOWN = 0
    NEW = 1
    ESTABLISHED = 2
    REPLY = 3
    RELATED = 4
    REOPENED = 5
    SRV6_ENCAP = 6
    SRV6_DECAP = 7
    ENCRYPT_OVERLAY = 8


class TraceObservationPoint(IntEnum):
    """flow.TraceObservationPoint (the proto numbering, which differs from the monitor's)."""

    UNKNOWN_POINT = 0
    TO_PROXY = 1
    TO_HOST = 2
    TO_STACK = 3
    TO_OVERLAY = 4
    TO_ENDPOINT = 101
    FROM_ENDPOINT = 5
    FROM_PROXY = 6
    FROM_HOST = 7
    FROM_STACK = 8
    FROM_OVERLAY = 9
    FROM_NETWORK = 10
    TO_NETWORK = 11


class MessageType(IntEnum):
    """Cilium monitor message types: ``event_type.type`` of a flow."""

    UNSPEC = 0
    DROP = 1
    DEBUG = 2
    CAPTURE = 3
    TRACE = 4
    POLICY_VERDICT = 5
    RECORDER = 6
    TRACE_SOCK = 7
    ACCESS_LOG = 129
    AGENT = 130


MESSAGE_TYPE_NAMES: dict[str, MessageType] = {
    "drop": MessageType.DROP,
    "debug": MessageType.DEBUG,
    "capture": MessageType.CAPTURE,
    "trace": MessageType.TRACE,
    "policy-verdict": MessageType.POLICY_VERDICT,
    "recorder": MessageType.RECORDER,
    "trace-sock": MessageType.TRACE_SOCK,
    "l7": MessageType.ACCESS_LOG,
    "agent": MessageType.AGENT,
}
"""Names accepted by ``--type`` (``hubble observe --type drop``), as Cilium's MessageTypeNames."""


class MonitorTracePoint(IntEnum):
    """Trace notification sub-types (bpf/lib/trace.h): ``event_type.sub_type`` of a trace."""

    TO_LXC = 0
    TO_PROXY = 1
    TO_HOST = 2
    TO_STACK = 3
    TO_OVERLAY = 4
    FROM_LXC = 5
    FROM_PROXY = 6
    FROM_HOST = 7
    FROM_STACK = 8
    FROM_OVERLAY = 9
    FROM_NETWORK = 10
    TO_NETWORK = 11


TRACE_POINT_NAMES: dict[int, str] = {
    MonitorTracePoint.TO_LXC: "to-endpoint",
    MonitorTracePoint.TO_PROXY: "to-proxy",
    MonitorTracePoint.TO_HOST: "to-host",
    MonitorTracePoint.TO_STACK: "to-stack",
    MonitorTracePoint.TO_OVERLAY: "to-overlay",
    MonitorTracePoint.TO_NETWORK: "to-network",
    MonitorTracePoint.FROM_LXC: "from-endpoint",
    MonitorTracePoint.FROM_PROXY: "from-proxy",
    MonitorTracePoint.FROM_HOST: "from-host",
    MonitorTracePoint.FROM_STACK: "from-stack",
    MonitorTracePoint.FROM_OVERLAY: "from-overlay",
    MonitorTracePoint.FROM_NETWORK: "from-network",
}
"""Readable trace points (``--type trace:to-endpoint`` and compact output)."""

TRACE_POINT_TO_OBSERVATION: dict[int, TraceObservationPoint] = {
    MonitorTracePoint.TO_LXC: TraceObservationPoint.TO_ENDPOINT,
    MonitorTracePoint.TO_PROXY: TraceObservationPoint.TO_PROXY,
    MonitorTracePoint.TO_HOST: TraceObservationPoint.TO_HOST,
    MonitorTracePoint.TO_STACK: TraceObservationPoint.TO_STACK,
    MonitorTracePoint.TO_OVERLAY: TraceObservationPoint.TO_OVERLAY,
    MonitorTracePoint.TO_NETWORK: TraceObservationPoint.TO_NETWORK,
    MonitorTracePoint.FROM_LXC: TraceObservationPoint.FROM_ENDPOINT,
    MonitorTracePoint.FROM_PROXY: TraceObservationPoint.FROM_PROXY,
    MonitorTracePoint.FROM_HOST: TraceObservationPoint.FROM_HOST,
    MonitorTracePoint.FROM_STACK: TraceObservationPoint.FROM_STACK,
    MonitorTracePoint.FROM_OVERLAY: TraceObservationPoint.FROM_OVERLAY,
    MonitorTracePoint.FROM_NETWORK: TraceObservationPoint.FROM_NETWORK,
}
"""How Hubble's parser maps a trace sub-type to the flow's ``trace_observation_point``."""


class PolicyMatchType(IntEnum):
    """``policy_match_type`` of a policy-verdict flow (pkg/monitor/api/types.go)."""

    NONE = 0
    L3_ONLY = 1
    L3_L4 = 2
    L4_ONLY = 3
    ALL = 4


POLICY_MATCH_TEXT: dict[int, str] = {
    PolicyMatchType.NONE: "none",
    PolicyMatchType.L3_ONLY: "L3-Only",
    PolicyMatchType.L3_L4: "L3-L4",
    PolicyMatchType.L4_ONLY: "L4-Only",
    PolicyMatchType.ALL: "all",
}


def policy_match_text(match: int) -> str:
    return POLICY_MATCH_TEXT.get(match, "unknown")


class TCPFlag(IntFlag):
    """TCP header flag bits, the compact form the wire carries (``tf``)."""

    FIN = 0x01
    SYN = 0x02
    RST = 0x04
    PSH = 0x08
    ACK = 0x10
    URG = 0x20
    ECE = 0x40
    CWR = 0x80
    NS = 0x100


TCP_FLAGS_PROTO_ORDER: tuple[TCPFlag, ...] = (
    TCPFlag.FIN, TCPFlag.SYN, TCPFlag.RST, TCPFlag.PSH, TCPFlag.ACK,
    TCPFlag.URG, TCPFlag.ECE, TCPFlag.CWR, TCPFlag.NS,
)
"""Field order of flow.TCPFlags (JSON output)."""

TCP_FLAGS_SUMMARY_ORDER: tuple[TCPFlag, ...] = (
    TCPFlag.SYN, TCPFlag.ACK, TCPFlag.RST, TCPFlag.FIN, TCPFlag.PSH,
    TCPFlag.URG, TCPFlag.ECE, TCPFlag.CWR, TCPFlag.NS,
)
"""Order in Hubble's summary text ``TCP Flags: SYN, ACK``."""


def tcp_flag_names(bits: int, order: tuple[TCPFlag, ...] = TCP_FLAGS_SUMMARY_ORDER) -> list[str]:
    return [str(f.name) for f in order if bits & f]


class IPProto(IntEnum):
    """IP protocol numbers the wire's ``p`` field holds."""

    ICMP = 1
    TCP = 6
    UDP = 17
    ICMPV6 = 58
    SCTP = 132


class LostEventSource(IntEnum):
    """observer LostEventSource: where events were lost."""

    UNKNOWN_LOST_EVENT_SOURCE = 0
    PERF_EVENT_RING_BUFFER = 1
    OBSERVER_EVENTS_QUEUE = 2
    HUBBLE_RING_BUFFER = 3


ICMPV4_TYPE_NAMES: dict[int, str] = {
    0: "EchoReply",
    3: "DestinationUnreachable",
    4: "SourceQuench",
    5: "Redirect",
    8: "EchoRequest",
    9: "RouterAdvertisement",
    10: "RouterSolicitation",
    11: "TimeExceeded",
    12: "ParameterProblem",
    13: "TimestampRequest",
    14: "TimestampReply",
}
"""gopacket's ICMPv4 type names, as they appear in Hubble summaries (``ICMPv4 EchoRequest``)."""

ICMPV6_TYPE_NAMES: dict[int, str] = {
    1: "DestinationUnreachable",
    2: "PacketTooBig",
    3: "TimeExceeded",
    4: "ParameterProblem",
    128: "EchoRequest",
    129: "EchoReply",
    133: "RouterSolicitation",
    134: "RouterAdvertisement",
    135: "NeighborSolicitation",
    136: "NeighborAdvertisement",
}

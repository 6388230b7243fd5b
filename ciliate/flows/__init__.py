"""The flow model shared by datapath (producer), events (observer) and the CLI (printer).

Tables (``tables``) hold Hubble's and Cilium's enumerations; ``model`` the typed ``Flow`` and
its flat wire form; ``jsonpb`` Hubble's JSON; ``printer`` the compact/dict/table text.
"""

from ciliate.flows.codec import (
    decode_batch,
    encode_batch,
    envelope_items,
    pack_envelope,
    resolve_tables,
)
from ciliate.flows.jsonpb import flow_json, get_flows_response, parse_rfc3339, rfc3339, summary
from ciliate.flows.model import (
    DNS,
    HTTP,
    LOST_KIND,
    WIRE_DOC,
    Endpoint,
    Flow,
    Layer7,
    LostEvent,
    Service,
    Wire,
    Workload,
    decode_flow,
    drop_flow_defaults,
    encode_flow,
    is_lost,
    trace_flow_defaults,
)
from ciliate.flows.printer import compact, compact_record, dict_block, table
from ciliate.flows.tables import (
    DROP_REASON_TEXT,
    MESSAGE_TYPE_NAMES,
    TRACE_POINT_NAMES,
    DropReason,
    FlowType,
    IPProto,
    IPVersion,
    L7FlowType,
    LostEventSource,
    MessageType,
    MonitorTracePoint,
    PolicyMatchType,
    TCPFlag,
    TraceObservationPoint,
    TraceReason,
    TrafficDirection,
    Verdict,
    drop_reason_name,
    drop_reason_text,
)

__all__ = [
    "DNS", "DROP_REASON_TEXT", "HTTP", "LOST_KIND", "MESSAGE_TYPE_NAMES", "TRACE_POINT_NAMES",
    "WIRE_DOC", "DropReason", "Endpoint", "Flow", "FlowType", "IPProto", "IPVersion",
    "L7FlowType", "Layer7", "LostEvent", "LostEventSource", "MessageType", "MonitorTracePoint",
    "PolicyMatchType", "Service", "TCPFlag", "TraceObservationPoint", "TraceReason",
    "TrafficDirection",
    "Verdict", "Wire", "Workload", "compact", "compact_record", "decode_batch", "decode_flow",
    "dict_block", "drop_flow_defaults", "drop_reason_name", "drop_reason_text", "encode_batch",
    "encode_flow", "envelope_items", "flow_json", "get_flows_response", "is_lost",
    "pack_envelope", "parse_rfc3339", "resolve_tables", "rfc3339", "summary", "table",
    "trace_flow_defaults",
]

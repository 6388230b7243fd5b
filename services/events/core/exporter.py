"""Hubble's flow-log exporter, pure part: allow/deny filters and a field mask.

Each exported line is a GetFlowsResponse JSON object; the field mask (``time``,
``source.namespace``, ``verdict``...) keeps only the listed paths of the flow, as Hubble's
``fieldMask`` option does. File writing and rotation live in ``services.events.export_file``.

The OTLP exporter renders the same way and turns each exported record into one OTLP log
record (``LogRecordData``): body = the GetFlowsResponse JSON text, as Hubble's OpenTelemetry
adaptor (hubble-otel) sends it with its JSON encoding, and a few attributes read from the
(masked) JSON, so a field the mask removes is not in the attributes either. Sending lives in
``services.events.export_otlp``; nothing here imports OpenTelemetry.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from ciliate.flows.jsonpb import get_flows_response
from ciliate.flows.model import Wire
from services.events.core.filters import FilterSet, FlowFilter


def apply_field_mask(obj: dict[str, Any], paths: Sequence[str]) -> dict[str, Any]:
    """Keep only the dotted ``paths`` of ``obj`` (a path naming a message keeps all of it)."""
    out: dict[str, Any] = {}
    for path in paths:
        head, _, rest = path.partition(".")
        if head not in obj:
            continue
        value = obj[head]
        if rest and isinstance(value, dict):
            sub = apply_field_mask(value, [rest])
            if sub:
                merged = out.setdefault(head, {})
                if isinstance(merged, dict):
                    _deep_merge(merged, sub)
        else:
            out[head] = value
    return out


def _deep_merge(into: dict[str, Any], other: dict[str, Any]) -> None:
    for k, v in other.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _deep_merge(into[k], v)
        else:
            into[k] = v


EVENT_KIND = "cilium.event_kind"
EVENT_ENCODING = "cilium.event_encoding"
FLOW_KIND = "flow/v1alpha2"
LOST_KIND = "lost_events"
OTLP_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "cilium.node_name": ("node_name",),
    "cilium.flow.verdict": ("flow", "verdict"),
    "cilium.flow.type": ("flow", "Type"),
    "cilium.flow.drop_reason": ("flow", "drop_reason_desc"),
    "cilium.flow.traffic_direction": ("flow", "traffic_direction"),
    "cilium.flow.source.namespace": ("flow", "source", "namespace"),
    "cilium.flow.source.pod_name": ("flow", "source", "pod_name"),
    "cilium.flow.source.identity": ("flow", "source", "identity"),
    "cilium.flow.destination.namespace": ("flow", "destination", "namespace"),
    "cilium.flow.destination.pod_name": ("flow", "destination", "pod_name"),
    "cilium.flow.destination.identity": ("flow", "destination", "identity"),
    "cilium.flow.summary": ("flow", "Summary"),
}
"""OTLP log attributes: name → path in the GetFlowsResponse JSON (absent when the path is)."""


class LogRecordData(NamedTuple):
    """One exported record as an OTLP log record, without OpenTelemetry types."""

    time_ns: int
    body: str
    attributes: dict[str, str | int]


def _lookup(obj: dict[str, Any], path: tuple[str, ...]) -> Any:
    value: Any = obj
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


@dataclass
class ExportConfig:
    allow_list: list[FlowFilter] = field(default_factory=list)
    deny_list: list[FlowFilter] = field(default_factory=list)
    field_mask: list[str] = field(default_factory=list)


class ExporterCore:
    """Decides what is exported and renders it; counts what it exported and skipped."""

    def __init__(self, config: ExportConfig) -> None:
        self.config = config
        self.filters = FilterSet(config.allow_list, config.deny_list)
        self.exported = 0
        self.skipped = 0

    def render(self, w: Wire) -> dict[str, Any] | None:
        if not self.filters.match(w):
            self.skipped += 1
            return None
        response = get_flows_response(w)
        if self.config.field_mask and "flow" in response:
            response["flow"] = apply_field_mask(response["flow"], self.config.field_mask)
        self.exported += 1
        return response

    def render_line(self, w: Wire) -> str | None:
        obj = self.render(w)
        return None if obj is None else json.dumps(obj, separators=(",", ":")) + "\n"

    def render_log(self, w: Wire) -> LogRecordData | None:
        """The OTLP log record of ``w``, or None when the filters keep it out."""
        obj = self.render(w)
        if obj is None:
            return None
        attributes: dict[str, str | int] = {
            EVENT_KIND: FLOW_KIND if "flow" in obj else LOST_KIND, EVENT_ENCODING: "JSON"}
        for name, path in OTLP_ATTRIBUTES.items():
            value = _lookup(obj, path)
            if isinstance(value, (str, int)) and not isinstance(value, bool) and value != "":
                attributes[name] = value
        time_ns = int(w.get("t") or 0)
        return LogRecordData(time_ns, json.dumps(obj, separators=(",", ":")), attributes)

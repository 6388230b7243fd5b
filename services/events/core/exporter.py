"""Hubble's flow-log exporter, pure part: allow/deny filters and a field mask.

Each exported line is a GetFlowsResponse JSON object; the field mask (``time``,
``source.namespace``, ``verdict``...) keeps only the listed paths of the flow, as Hubble's
``fieldMask`` option does. File writing and rotation live in ``services.events.export_file``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

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

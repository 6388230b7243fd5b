"""The events service's settings from ``CILIATE_*`` environment variables, as Hubble's options.

Parsed from a plain mapping (no I/O) so a bad value is reported by variable name at start-up.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from services.events.core.exporter import ExportConfig
from services.events.core.filters import FilterError, FlowFilter
from services.events.core.metrics import MetricOptions
from services.events.core.ring import DEFAULT_CAPACITY, valid_capacity

DEFAULT_METRICS = "flow drop"
"""Enabled when ``CILIATE_HUBBLE_METRICS`` is unset; set it to ``""`` to disable all."""

METRIC_ALIASES = {"flow": "flows-processed"}
"""Hubble's ``--hubble-metrics`` names that our core spells differently."""

ENV_DOC: dict[str, str] = {
    "CILIATE_EVENTS_RING_SIZE": "ring capacity per node, 2^n-1 (Hubble's --hubble-event-buffer-"
                                "capacity), default 4095",
    "CILIATE_EVENTS_FOLLOWER_QUEUE": "records queued per follower before its drops are counted, "
                                     "default 4096",
    "CILIATE_HUBBLE_METRICS": "space/comma separated metrics as Hubble's --hubble-metrics, e.g. "
                              "'flow drop:sourceContext=namespace tcp port-distribution'",
    "CILIATE_EVENTS_EXPORT_FILE": "flow log path (Hubble's --hubble-export-file-path); unset = "
                                  "no export",
    "CILIATE_EVENTS_EXPORT_MAX_SIZE_MB": "rotate past this size, default 10",
    "CILIATE_EVENTS_EXPORT_MAX_BACKUPS": "rotated files kept, default 5",
    "CILIATE_EVENTS_EXPORT_ALLOWLIST": "JSON list of FlowFilter objects (or one per line)",
    "CILIATE_EVENTS_EXPORT_DENYLIST": "JSON list of FlowFilter objects (or one per line)",
    "CILIATE_EVENTS_EXPORT_FIELDMASK": "comma/space separated field paths kept in each flow",
}


class ConfigError(ValueError):
    def __init__(self, variable: str, message: str) -> None:
        super().__init__(f"{variable}: {message}")
        self.variable = variable


@dataclass
class EventsConfig:
    ring_size: int = DEFAULT_CAPACITY
    follower_queue: int = 4096
    metrics: list[MetricOptions] = field(default_factory=list)
    export_path: str = ""
    export_max_bytes: int = 10 * 1024 * 1024
    export_backups: int = 5
    export: ExportConfig = field(default_factory=ExportConfig)


def _int(env: Mapping[str, str], name: str, default: int, minimum: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(name, f"not an integer: {raw!r}") from None
    if value < minimum:
        raise ConfigError(name, f"must be at least {minimum}, got {value}")
    return value


def parse_metrics(text: str) -> list[MetricOptions]:
    """Hubble's metrics list: ``flow drop:sourceContext=namespace;destinationContext=pod``."""
    out: list[MetricOptions] = []
    for item in re.split(r"[\s,]+", text.strip()):
        if not item:
            continue
        name, sep, opts = item.partition(":")
        out.append(MetricOptions.parse(METRIC_ALIASES.get(name, name) + sep + opts))
    return out


def parse_filter_list(text: str, name: str) -> list[FlowFilter]:
    """A JSON array of FlowFilters, or one FlowFilter JSON object per line (Hubble's form)."""
    text = text.strip()
    if not text:
        return []
    try:
        if text.startswith("["):
            items = json.loads(text)
        else:
            items = [json.loads(line) for line in text.splitlines() if line.strip()]
        if not all(isinstance(i, dict) for i in items):
            raise ConfigError(name, "each filter must be a JSON object")
        return [FlowFilter.from_json(i) for i in items]
    except json.JSONDecodeError as exc:
        raise ConfigError(name, f"malformed JSON: {exc}") from None
    except FilterError as exc:
        raise ConfigError(name, str(exc)) from None


def from_env(env: Mapping[str, str]) -> EventsConfig:
    ring_size = _int(env, "CILIATE_EVENTS_RING_SIZE", DEFAULT_CAPACITY, 1)
    if not valid_capacity(ring_size):
        raise ConfigError("CILIATE_EVENTS_RING_SIZE",
                          f"must be 2^n-1 (for example 4095), got {ring_size}")
    metrics_text = env.get("CILIATE_HUBBLE_METRICS", DEFAULT_METRICS)
    try:
        metrics = parse_metrics(metrics_text)
    except ValueError as exc:
        raise ConfigError("CILIATE_HUBBLE_METRICS", str(exc)) from None
    mask = [p for p in re.split(r"[\s,]+", env.get("CILIATE_EVENTS_EXPORT_FIELDMASK", "")) if p]
    return EventsConfig(
        ring_size=ring_size,
        follower_queue=_int(env, "CILIATE_EVENTS_FOLLOWER_QUEUE", 4096, 1),
        metrics=metrics,
        export_path=env.get("CILIATE_EVENTS_EXPORT_FILE", "").strip(),
        export_max_bytes=_int(env, "CILIATE_EVENTS_EXPORT_MAX_SIZE_MB", 10, 1) * 1024 * 1024,
        export_backups=_int(env, "CILIATE_EVENTS_EXPORT_MAX_BACKUPS", 5, 0),
        export=ExportConfig(
            allow_list=parse_filter_list(env.get("CILIATE_EVENTS_EXPORT_ALLOWLIST", ""),
                                         "CILIATE_EVENTS_EXPORT_ALLOWLIST"),
            deny_list=parse_filter_list(env.get("CILIATE_EVENTS_EXPORT_DENYLIST", ""),
                                        "CILIATE_EVENTS_EXPORT_DENYLIST"),
            field_mask=mask,
        ),
    )

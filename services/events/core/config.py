"""The events service's settings from ``CILIATE_*`` environment variables, as Hubble's options.

Parsed from a plain mapping (no I/O) so a bad value is reported by variable name at start-up.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit, urlunsplit

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
    "CILIATE_EVENTS_OTLP_ENDPOINT": "OTLP/HTTP logs URL (http://collector:4318/v1/logs; a URL "
                                    "without a path gets /v1/logs); unset = no OTLP export",
    "CILIATE_EVENTS_OTLP_HEADERS": "headers of each export request, key=value,key2=value2 "
                                   "(values URL-encoded, as OTEL_EXPORTER_OTLP_HEADERS)",
    "CILIATE_EVENTS_OTLP_TIMEOUT": "seconds per export request, default 10",
    "CILIATE_EVENTS_OTLP_QUEUE": "log records queued for export before drops are counted, "
                                 "default 8192",
    "CILIATE_EVENTS_OTLP_ALLOWLIST": "as CILIATE_EVENTS_EXPORT_ALLOWLIST, for OTLP export",
    "CILIATE_EVENTS_OTLP_DENYLIST": "as CILIATE_EVENTS_EXPORT_DENYLIST, for OTLP export",
    "CILIATE_EVENTS_OTLP_FIELDMASK": "as CILIATE_EVENTS_EXPORT_FIELDMASK, for OTLP export",
}


class ConfigError(ValueError):
    def __init__(self, variable: str, message: str) -> None:
        super().__init__(f"{variable}: {message}")
        self.variable = variable


@dataclass
class OtlpConfig:
    """OTLP log export: off while ``endpoint`` is empty."""

    endpoint: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    timeout: float = 10.0
    queue: int = 8192
    export: ExportConfig = field(default_factory=ExportConfig)


@dataclass
class EventsConfig:
    ring_size: int = DEFAULT_CAPACITY
    follower_queue: int = 4096
    metrics: list[MetricOptions] = field(default_factory=list)
    export_path: str = ""
    export_max_bytes: int = 10 * 1024 * 1024
    export_backups: int = 5
    export: ExportConfig = field(default_factory=ExportConfig)
    otlp: OtlpConfig = field(default_factory=OtlpConfig)


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


def parse_endpoint(text: str, name: str) -> str:
    """An http(s) URL with a host; one without a path gets OTLP's ``/v1/logs``."""
    text = text.strip()
    if not text:
        return ""
    try:
        url = urlsplit(text)
        url.port  # noqa: B018 -- raises ValueError for a port that is not a number
    except ValueError as exc:
        raise ConfigError(name, f"not a URL: {exc}") from None
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ConfigError(name, f"must be an http:// or https:// URL with a host, got {text!r}")
    if url.path in ("", "/"):
        url = url._replace(path="/v1/logs")
    return urlunsplit(url)


def parse_headers(text: str, name: str) -> dict[str, str]:
    """``key=value,key2=value2`` (OTEL_EXPORTER_OTLP_HEADERS' form, values URL-encoded)."""
    out: dict[str, str] = {}
    for item in text.split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", key):
            raise ConfigError(name, f"expected key=value pairs separated by commas, got {item!r}")
        value = unquote(value.strip())
        if any(c in value for c in "\r\n\0"):
            raise ConfigError(name, f"header {key!r}: value has a line break or NUL")
        out[key] = value
    return out


def _export_config(env: Mapping[str, str], prefix: str) -> ExportConfig:
    mask = [p for p in re.split(r"[\s,]+", env.get(prefix + "FIELDMASK", "")) if p]
    return ExportConfig(
        allow_list=parse_filter_list(env.get(prefix + "ALLOWLIST", ""), prefix + "ALLOWLIST"),
        deny_list=parse_filter_list(env.get(prefix + "DENYLIST", ""), prefix + "DENYLIST"),
        field_mask=mask,
    )


def _seconds(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(name, f"not a number of seconds: {raw!r}") from None
    if not 0 < value <= 300:
        raise ConfigError(name, f"must be more than 0 and at most 300 seconds, got {raw}")
    return value


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
    return EventsConfig(
        ring_size=ring_size,
        follower_queue=_int(env, "CILIATE_EVENTS_FOLLOWER_QUEUE", 4096, 1),
        metrics=metrics,
        export_path=env.get("CILIATE_EVENTS_EXPORT_FILE", "").strip(),
        export_max_bytes=_int(env, "CILIATE_EVENTS_EXPORT_MAX_SIZE_MB", 10, 1) * 1024 * 1024,
        export_backups=_int(env, "CILIATE_EVENTS_EXPORT_MAX_BACKUPS", 5, 0),
        export=_export_config(env, "CILIATE_EVENTS_EXPORT_"),
        otlp=OtlpConfig(
            endpoint=parse_endpoint(env.get("CILIATE_EVENTS_OTLP_ENDPOINT", ""),
                                    "CILIATE_EVENTS_OTLP_ENDPOINT"),
            headers=parse_headers(env.get("CILIATE_EVENTS_OTLP_HEADERS", ""),
                                  "CILIATE_EVENTS_OTLP_HEADERS"),
            timeout=_seconds(env, "CILIATE_EVENTS_OTLP_TIMEOUT", 10.0),
            queue=_int(env, "CILIATE_EVENTS_OTLP_QUEUE", 8192, 1),
            export=_export_config(env, "CILIATE_EVENTS_OTLP_"),
        ),
    )

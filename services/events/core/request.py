"""Query parameters of ``GET /v1/flows`` and ``GET /v1/events`` → a query, validated by field.

Filters travel as Hubble's JSON: ``whitelist`` and ``blacklist`` are JSON arrays of FlowFilter
objects (proto field names). Time bounds take RFC 3339, nanoseconds since the epoch, or a
duration back from now (``30s``, ``5m``, ``1h``, ``2h30m``) as ``hubble observe --since``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from ciliate.flows.jsonpb import parse_rfc3339
from services.events.core.filters import FilterError, FilterSet, FlowFilter
from services.events.core.query import FlowQuery

Params = Mapping[str, Sequence[str]]

FLOW_PARAMS = ("whitelist", "blacklist", "since", "until", "first", "last", "all", "follow",
               "node", "encoding")
"""Query parameters ``GET /v1/flows`` understands (listed in the OpenAPI document)."""

_DURATION = re.compile(r"^(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?$")
ENCODINGS = ("json", "wire")


class RequestError(ValueError):
    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name
        self.message = message


@dataclass
class StreamRequest:
    """What a caller asked for: the query, whether to follow, and the JSON encoding."""

    query: FlowQuery
    follow: bool = False
    encoding: str = "json"


def parse_time(text: str, now_ns: int, name: str) -> int:
    """RFC 3339, integer nanoseconds, or a duration before ``now_ns``."""
    text = text.strip()
    if text.isdigit():
        return int(text)
    m = _DURATION.match(text)
    if m and any(m.groups()):
        hours, minutes, seconds = (float(g or 0) for g in m.groups())
        return now_ns - int((hours * 3600 + minutes * 60 + seconds) * 1_000_000_000)
    try:
        return parse_rfc3339(text)
    except ValueError:
        raise RequestError(name, f"not an RFC 3339 time, nanoseconds or a duration like 5m: "
                                 f"{text!r}") from None


def _one(params: Params, name: str) -> str | None:
    values = params.get(name)
    if not values:
        return None
    if len(values) > 1:
        raise RequestError(name, "given more than once")
    return values[0]


def _bool(params: Params, name: str) -> bool:
    value = _one(params, name)
    if value is None:
        return False
    if value.lower() in ("", "1", "true", "yes"):
        return True
    if value.lower() in ("0", "false", "no"):
        return False
    raise RequestError(name, f"expected true or false, got {value!r}")


def _count(params: Params, name: str) -> int | None:
    value = _one(params, name)
    if value is None:
        return None
    if not value.isdigit():
        raise RequestError(name, f"expected a non-negative integer, got {value!r}")
    return int(value)


def _filters(params: Params, name: str) -> list[FlowFilter]:
    out: list[FlowFilter] = []
    for text in params.get(name, ()):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RequestError(name, f"malformed JSON: {exc}") from None
        if isinstance(items, dict):
            items = [items]
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            raise RequestError(name, "expected a JSON array of FlowFilter objects")
        try:
            out.extend(FlowFilter.from_json(i) for i in items)
        except (FilterError, KeyError, TypeError, ValueError) as exc:
            detail = exc.field + ": " + exc.message if isinstance(exc, FilterError) else str(exc)
            raise RequestError(name, detail) from None
    return out


def parse_common(params: Params, now_ns: int, filters: FilterSet) -> StreamRequest:
    """Time window, first/last, follow, nodes and encoding (shared by flows and events)."""
    since = _one(params, "since")
    until = _one(params, "until")
    first, last = _count(params, "first"), _count(params, "last")
    if first is not None and last is not None:
        raise RequestError("first", "first and last cannot be combined")
    every = _bool(params, "all")
    if every and (first is not None or last is not None):
        raise RequestError("all", "all cannot be combined with first or last")
    encoding = _one(params, "encoding") or "json"
    if encoding not in ENCODINGS:
        raise RequestError("encoding", f"expected one of {', '.join(ENCODINGS)}")
    query = FlowQuery(
        filters=filters,
        since_ns=parse_time(since, now_ns, "since") if since is not None else None,
        until_ns=parse_time(until, now_ns, "until") if until is not None else None,
        number=first if first is not None else last,
        first=first is not None,
        nodes=list(params["node"]) if params.get("node") else None,
    )
    if (query.since_ns is not None and query.until_ns is not None
            and query.since_ns > query.until_ns):
        raise RequestError("until", "until is before since")
    return StreamRequest(query, follow=_bool(params, "follow"), encoding=encoding)


def parse_flow_request(params: Params, now_ns: int) -> StreamRequest:
    """A ``GET /v1/flows`` request; every problem names its parameter."""
    white, black = _filters(params, "whitelist"), _filters(params, "blacklist")
    for name, chosen in (("whitelist", white), ("blacklist", black)):
        try:
            FilterSet(chosen)
        except FilterError as exc:
            raise RequestError(name, f"{exc.field}: {exc.message}") from None
    return parse_common(params, now_ns, FilterSet(white, black))


def predicate_filters(match: Callable[[dict[str, object]], bool]) -> FilterSet:
    """A FilterSet whose hot-path match is ``match`` (process events are not flows)."""
    return FilterSet.from_predicate(match)

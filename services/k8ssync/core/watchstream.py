"""Sans-io parser for a Kubernetes watch response body: bytes in, events out.

The API server writes one JSON object per event, each followed by a newline, inside an HTTP
chunked body whose chunk boundaries fall anywhere (mid-object, mid-UTF-8 character). Feed the
bytes as they come; complete events come out in order. ``ERROR`` events carry a ``Status``
object; code 410 means the resourceVersion we resumed from is gone and the caller must relist.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

MAX_EVENT_BYTES = 32 * 1024 * 1024
"""An event larger than this is refused rather than buffered without bound (etcd's own limit
on an object is 1.5 MiB; a watch line far past it means a broken stream)."""


class EventType(StrEnum):
    ADDED = "ADDED"
    MODIFIED = "MODIFIED"
    DELETED = "DELETED"
    BOOKMARK = "BOOKMARK"
    ERROR = "ERROR"


class WatchProtocolError(ValueError):
    """The body is not a Kubernetes watch stream (bad JSON, unknown type, oversized line)."""


@dataclass(frozen=True)
class WatchEvent:
    type: EventType
    object: dict[str, Any]

    @property
    def resource_version(self) -> str:
        meta = self.object.get("metadata") or {}
        return str(meta.get("resourceVersion") or "")

    @property
    def status_code(self) -> int:
        """The HTTP-like code of an ``ERROR`` event's Status (0 when absent)."""
        code = self.object.get("code")
        return code if isinstance(code, int) else 0

    @property
    def is_gone(self) -> bool:
        """True for the API's "resourceVersion too old" answer: relist, then watch again."""
        return self.type is EventType.ERROR and (
            self.status_code == 410 or self.object.get("reason") in ("Expired", "Gone")
        )


def parse_event(raw: Any) -> WatchEvent:
    """One decoded watch line into a :class:`WatchEvent`, checking the documented shape."""
    if not isinstance(raw, dict):
        raise WatchProtocolError(f"watch event is not an object: {raw!r:.80}")
    try:
        kind = EventType(str(raw.get("type")))
    except ValueError:
        raise WatchProtocolError(f"unknown watch event type {raw.get('type')!r}") from None
    obj = raw.get("object")
    if not isinstance(obj, dict):
        raise WatchProtocolError(f"{kind} event without an object")
    return WatchEvent(kind, obj)


class WatchStreamParser:
    """Accumulates body bytes; :meth:`feed` returns the events completed by those bytes."""

    def __init__(self, max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        self._buffer = bytearray()
        self._max = max_event_bytes

    def feed(self, data: bytes) -> list[WatchEvent]:
        self._buffer += data
        events: list[WatchEvent] = []
        start = 0
        while True:
            end = self._buffer.find(b"\n", start)
            if end < 0:
                break
            events.extend(self._decode_line(bytes(self._buffer[start:end])))
            start = end + 1
        del self._buffer[:start]
        if len(self._buffer) > self._max:
            raise WatchProtocolError(f"watch event larger than {self._max} bytes")
        return events

    def close(self) -> list[WatchEvent]:
        """End of body: a last event without its newline still counts."""
        rest, self._buffer = bytes(self._buffer), bytearray()
        return self._decode_line(rest)

    @property
    def pending(self) -> int:
        """Bytes of an event not yet complete."""
        return len(self._buffer)

    @staticmethod
    def _decode_line(line: bytes) -> list[WatchEvent]:
        try:
            text = line.decode("utf-8").strip()
        except UnicodeDecodeError as exc:
            raise WatchProtocolError(f"watch line is not UTF-8: {exc}") from None
        decoder = json.JSONDecoder()
        events = []
        pos = 0
        while pos < len(text):
            try:
                raw, pos = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as exc:
                raise WatchProtocolError(f"watch line is not JSON: {exc}") from None
            events.append(parse_event(raw))
            while pos < len(text) and text[pos].isspace():
                pos += 1
        return events

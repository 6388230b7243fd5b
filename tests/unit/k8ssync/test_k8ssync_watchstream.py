"""The watch-stream parser: any split of the body into chunks yields the same events."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.k8ssync.core.watchstream import (
    EventType,
    WatchProtocolError,
    WatchStreamParser,
)

EVENTS = [
    {"type": "ADDED", "object": {"kind": "Pod", "metadata": {"name": "a", "resourceVersion": "5"}}},
    {"type": "MODIFIED", "object": {"metadata": {"name": "é-ünïcode", "resourceVersion": "6"}}},
    {"type": "BOOKMARK", "object": {"kind": "Pod", "metadata": {"resourceVersion": "9"}}},
    {"type": "DELETED", "object": {"metadata": {"name": "a", "resourceVersion": "10"}}},
    {"type": "ERROR", "object": {"kind": "Status", "code": 410, "reason": "Expired"}},
]
BODY = b"".join(json.dumps(e, ensure_ascii=False).encode() + b"\n" for e in EVENTS)


@given(st.lists(st.integers(min_value=0, max_value=len(BODY)), max_size=30))
def test_events_are_the_same_however_the_body_is_chunked(cuts: list[int]) -> None:
    points = sorted(set(cuts))
    chunks = [BODY[a:b] for a, b in zip([0, *points], [*points, len(BODY)], strict=True)]
    parser = WatchStreamParser()
    events = [e for chunk in chunks for e in parser.feed(chunk)] + parser.close()
    assert [(e.type.value, e.object) for e in events] == [(e["type"], e["object"]) for e in EVENTS]
    assert parser.pending == 0


def test_resource_versions_and_gone() -> None:
    events = WatchStreamParser().feed(BODY)
    assert [e.resource_version for e in events] == ["5", "6", "9", "10", ""]
    assert [e.is_gone for e in events] == [False, False, False, False, True]
    assert events[2].type is EventType.BOOKMARK


def test_an_incomplete_event_waits_and_a_trailing_one_counts_at_close() -> None:
    parser = WatchStreamParser()
    line = json.dumps(EVENTS[0]).encode()
    assert parser.feed(line[:10]) == []
    assert parser.feed(line[10:]) == []
    assert parser.pending == len(line)
    assert [e.resource_version for e in parser.close()] == ["5"]


@pytest.mark.parametrize("body", [b"{nope}\n", b'{"type": "SOMETHING", "object": {}}\n',
                                  b'{"type": "ADDED"}\n', b"[1]\n", b"\xff\xfe\n"])
def test_malformed_streams_are_refused(body: bytes) -> None:
    with pytest.raises(WatchProtocolError):
        WatchStreamParser().feed(body)


def test_an_endless_line_is_refused_not_buffered() -> None:
    parser = WatchStreamParser(max_event_bytes=100)
    with pytest.raises(WatchProtocolError, match="larger than 100"):
        parser.feed(b'{"type": "ADDED", "object": {"x": "' + b"a" * 200)

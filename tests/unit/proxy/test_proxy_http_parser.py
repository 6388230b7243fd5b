"""The sans-io HTTP parser: framing, pipelining, malformed input, and fuzzing."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.datapath.proxy.core.http import Body, End, Head, ParseError, Parser

PIPELINE = (
    b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
    b"POST /v1/request-landing HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
    b"PUT /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\n"
    b"X-Trailer: 1\r\n\r\n"
    b"GET /d HTTP/1.0\r\n\r\n"
)


def messages(events: Sequence[object]) -> list[tuple[str, bytes, bool]]:
    """(method or status, decoded body, keep-alive) per complete message."""
    out: list[tuple[str, bytes, bool]] = []
    head: Head | None = None
    body = b""
    for ev in events:
        if isinstance(ev, Head):
            head, body = ev, b""
        elif isinstance(ev, Body):
            body += ev.data
        elif isinstance(ev, End):
            assert head is not None
            out.append((head.method or str(head.status), body, head.keep_alive))
    return out


def test_pipelined_requests_with_lengths_and_chunks() -> None:
    events = Parser().feed(PIPELINE)
    assert messages(events) == [
        ("GET", b"", True), ("POST", b"hello", True), ("PUT", b"abcde", True), ("GET", b"", False),
    ]
    raw = b"".join(e.raw for e in events)
    assert raw == PIPELINE  # forwarding raw bytes reproduces the stream exactly


@given(st.lists(st.integers(min_value=1, max_value=len(PIPELINE) - 1), max_size=8))
def test_any_split_gives_the_same_messages(cuts: list[int]) -> None:
    parser = Parser()
    events: list[object] = []
    bounds = [0, *sorted(set(cuts)), len(PIPELINE)]
    for a, b in itertools.pairwise(bounds):
        events += parser.feed(PIPELINE[a:b])
    assert messages(events) == messages(Parser().feed(PIPELINE))
    assert parser.idle


@pytest.mark.parametrize("bad", [
    b"GET\r\n\r\n",
    b"GET / HTTP/2.0\r\n\r\n",
    b"GET / HTTP/1.1\r\nBad Header\r\n\r\n",
    b"POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
    b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1\r\naXX",
    b"G\x00T / HTTP/1.1\r\n\r\n",
])
def test_malformed_requests_raise_parse_error(bad: bytes) -> None:
    with pytest.raises(ParseError):
        Parser().feed(bad)


def test_oversized_head_is_431() -> None:
    with pytest.raises(ParseError) as info:
        Parser().feed(b"GET / HTTP/1.1\r\nX: " + b"a" * 70000)
    assert info.value.status == 431


def test_responses_head_204_and_until_close() -> None:
    p = Parser(responses=True)
    p.expect("HEAD")
    p.expect("GET")
    p.expect("GET")
    ev = p.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n"
                b"HTTP/1.0 200 OK\r\n\r\nrest")
    ev += p.eof()
    assert messages(ev) == [("200", b"", True), ("204", b"", True), ("200", b"rest", False)]


@settings(max_examples=300)
@given(st.binary(max_size=400), st.booleans())
def test_fuzz_never_raises_anything_but_parse_error(data: bytes, responses: bool) -> None:
    p = Parser(responses=responses)
    try:
        p.feed(data)
        p.eof()
    except ParseError:
        pass


@settings(max_examples=200)
@given(st.lists(st.sampled_from([
    b"GET / HTTP/1.1\r\n", b"Host: a\r\n", b"Content-Length: 3\r\n", b"\r\n", b"abc",
    b"Transfer-Encoding: chunked\r\n", b"3\r\n", b"0\r\n", b"HTTP/1.1 200 OK\r\n", b" ", b":",
]), max_size=20), st.booleans())
def test_fuzz_http_shaped_input(parts: list[bytes], responses: bool) -> None:
    p = Parser(responses=responses)
    try:
        for part in parts:
            p.feed(part)
    except ParseError:
        pass

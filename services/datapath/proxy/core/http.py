"""Sans-io HTTP/1.1 message parser: bytes in, events out.

One parser reads one direction of one connection. ``feed`` takes whatever arrived and returns
the events it completes: a ``Head`` (request or status line plus headers), ``Body`` pieces, and
an ``End`` per message; pipelined messages simply follow each other. Every event carries the
``raw`` wire bytes it was parsed from, so a proxy forwards exactly what it received (chunk
framing included) and the concatenation of all ``raw`` equals the input consumed.

Malformed input raises ``ParseError`` (the proxy answers 400 and closes); the parser never
raises anything else, which the hypothesis fuzz tests check.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum, auto

MAX_HEAD_BYTES = 64 * 1024
MAX_CHUNK_LINE = 1024
TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
VERSIONS = (b"HTTP/1.0", b"HTTP/1.1")
NO_BODY_STATUS = frozenset({204, 304})


class ParseError(ValueError):
    """The peer sent something that is not HTTP/1.x; ``status`` is what to answer."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


Headers = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Head:
    """A request line (method, target) or a status line (status, reason), and the headers."""

    version: str
    headers: Headers
    raw: bytes
    method: str = ""
    target: str = ""
    status: int = 0
    reason: str = ""
    keep_alive: bool = True

    def header(self, name: str) -> str | None:
        """The first value of ``name`` (case-insensitive), or None."""
        lname = name.lower()
        for key, value in self.headers:
            if key.lower() == lname:
                return value
        return None


@dataclass(frozen=True)
class Body:
    data: bytes  # the payload (chunk framing removed)
    raw: bytes  # the wire bytes (chunk framing kept)


@dataclass(frozen=True)
class End:
    raw: bytes = b""  # trailing chunk framing, if any


Event = Head | Body | End


class _State(Enum):
    HEAD = auto()
    LENGTH = auto()
    CHUNK_SIZE = auto()
    CHUNK_DATA = auto()
    CHUNK_CRLF = auto()
    TRAILERS = auto()
    UNTIL_CLOSE = auto()
    CLOSED = auto()


@dataclass
class Parser:
    """Parses requests (``responses=False``) or responses on one connection.

    A response parser must be told, per request, whether that request was HEAD (its response
    has no body whatever the headers say): ``expect(method)`` queues the methods in order.
    """

    responses: bool = False
    _buf: bytearray = field(default_factory=bytearray)
    _state: _State = _State.HEAD
    _remaining: int = 0
    _methods: list[str] = field(default_factory=list)
    _pending_end: bool = False  # a bodiless response (HEAD, 204, 304) ends right after its head

    def expect(self, method: str) -> None:
        self._methods.append(method)

    @property
    def idle(self) -> bool:
        """Between messages with nothing buffered."""
        return self._state is _State.HEAD and not self._buf

    def feed(self, data: bytes) -> list[Event]:
        if self._state is _State.CLOSED:
            if data:
                raise ParseError("data after a message that ended the connection")
            return []
        self._buf += data
        events: list[Event] = []
        while True:
            event = self._step()
            if event is None:
                return events
            events.append(event)

    def eof(self) -> list[Event]:
        """The peer closed: ends a read-until-close body; mid-message is an error."""
        if self._state is _State.UNTIL_CLOSE:
            self._state = _State.CLOSED
            return [End()]
        if self._state in (_State.HEAD, _State.CLOSED) and not self._buf:
            return []
        raise ParseError("connection closed in the middle of a message")

    # -- states ------------------------------------------------------------------------------

    def _step(self) -> Event | None:
        if self._pending_end:
            self._pending_end = False
            return End()
        state = self._state
        if state is _State.HEAD:
            return self._head()
        if state is _State.LENGTH:
            return self._length()
        if state is _State.CHUNK_SIZE:
            return self._chunk_size()
        if state is _State.CHUNK_DATA:
            return self._chunk_data()
        if state is _State.CHUNK_CRLF:
            return self._chunk_crlf()
        if state is _State.TRAILERS:
            return self._trailers()
        if state is _State.UNTIL_CLOSE and self._buf:
            raw = bytes(self._buf)
            self._buf.clear()
            return Body(raw, raw)
        return None

    def _take(self, n: int) -> bytes:
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def _head(self) -> Event | None:
        # Tolerate empty lines before a request line (RFC 9112 2.2).
        while self._buf[:2] == b"\r\n":
            del self._buf[:2]
        end = self._buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buf) > MAX_HEAD_BYTES:
                raise ParseError("header section too large", 431)
            return None
        if end + 4 > MAX_HEAD_BYTES:
            raise ParseError("header section too large", 431)
        raw = self._take(end + 4)
        lines = raw[:end].split(b"\r\n")
        if self.responses:
            head = self._status_line(lines[0], raw)
        else:
            head = self._request_line(lines[0], raw)
        headers = _parse_headers(lines[1:])
        head = _with_headers(head, headers)
        self._frame(head)
        return head

    def _request_line(self, line: bytes, raw: bytes) -> Head:
        parts = line.split(b" ")
        if len(parts) != 3:
            raise ParseError("malformed request line")
        method, target, version = parts
        if not TOKEN.fullmatch(method):
            raise ParseError("malformed method")
        if not target or any(c <= 0x20 or c == 0x7F for c in target):
            raise ParseError("malformed request target")
        if version not in VERSIONS:
            raise ParseError("unsupported HTTP version", 505)
        return Head(version.decode(), (), raw, method=method.decode(),
                    target=target.decode("latin-1"))

    def _status_line(self, line: bytes, raw: bytes) -> Head:
        version, _, rest = line.partition(b" ")
        code, _, reason = rest.partition(b" ")
        if version not in VERSIONS or len(code) != 3 or not code.isdigit():
            raise ParseError("malformed status line", 502)
        return Head(version.decode(), (), raw, status=int(code), reason=reason.decode("latin-1"))

    def _frame(self, head: Head) -> None:
        """How the body of ``head`` is delimited (RFC 9112 6.3)."""
        te = head.header("transfer-encoding")
        lengths = {v.strip() for k, v in head.headers if k.lower() == "content-length"}
        if self.responses:
            method = self._methods.pop(0) if self._methods else "GET"
            if head.status < 200:
                if head.status == 101:
                    raise ParseError("protocol upgrades are not proxied", 502)
                return  # interim response: the final one follows, for the same request
            if method == "HEAD" or head.status in NO_BODY_STATUS:
                self._state = _State.HEAD
                self._pending_end = True
                return
        if te is not None:
            if lengths:
                raise ParseError("both Transfer-Encoding and Content-Length")
            codings = [c.strip().lower() for c in te.split(",")]
            if codings[-1] != "chunked":
                if not self.responses:
                    raise ParseError("request body without chunked framing", 501)
                self._state = _State.UNTIL_CLOSE
                return
            self._state = _State.CHUNK_SIZE
            return
        if lengths:
            if len(lengths) != 1:
                raise ParseError("conflicting Content-Length values")
            value = lengths.pop()
            if not value.isdigit() or len(value) > 18:
                raise ParseError("malformed Content-Length")
            self._remaining = int(value)
            self._state = _State.LENGTH
            return
        if self.responses:
            self._state = _State.UNTIL_CLOSE
            return
        self._state = _State.LENGTH
        self._remaining = 0

    def _length(self) -> Event | None:
        if self._remaining == 0:
            self._state = _State.HEAD
            return End()
        if not self._buf:
            return None
        raw = self._take(self._remaining)
        self._remaining -= len(raw)
        return Body(raw, raw)

    def _chunk_size(self) -> Event | None:
        end = self._buf.find(b"\r\n")
        if end < 0:
            if len(self._buf) > MAX_CHUNK_LINE:
                raise ParseError("chunk size line too long")
            return None
        line = self._take(end + 2)
        size_text = line[:end].split(b";", 1)[0].strip()
        hexdigits = b"0123456789abcdefABCDEF"
        if not size_text or len(size_text) > 16 or not all(c in hexdigits for c in size_text):
            raise ParseError("malformed chunk size")
        self._remaining = int(size_text, 16)
        self._state = _State.CHUNK_DATA if self._remaining else _State.TRAILERS
        return Body(b"", line)

    def _chunk_data(self) -> Event | None:
        if not self._buf:
            return None
        raw = self._take(self._remaining)
        self._remaining -= len(raw)
        if self._remaining == 0:
            self._state = _State.CHUNK_CRLF
        return Body(raw, raw)

    def _chunk_crlf(self) -> Event | None:
        if len(self._buf) < 2:
            return None
        if self._buf[:2] != b"\r\n":
            raise ParseError("chunk data not followed by CRLF")
        self._state = _State.CHUNK_SIZE
        return Body(b"", self._take(2))

    def _trailers(self) -> Event | None:
        if self._buf[:2] == b"\r\n":
            self._state = _State.HEAD
            return End(self._take(2))
        end = self._buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buf) > MAX_HEAD_BYTES:
                raise ParseError("trailer section too large", 431)
            return None
        raw = self._take(end + 4)
        _parse_headers(raw[:end].split(b"\r\n"))
        self._state = _State.HEAD
        return End(raw)


def _parse_headers(lines: list[bytes]) -> Headers:
    out: list[tuple[str, str]] = []
    for line in lines:
        name, sep, value = line.partition(b":")
        if not sep or not TOKEN.fullmatch(name):
            raise ParseError("malformed header line")
        if any(c in b"\r\n\x00" for c in value):
            raise ParseError("invalid character in header value")
        out.append((name.decode("latin-1"), value.strip(b" \t").decode("latin-1")))
    return tuple(out)


def _with_headers(head: Head, headers: Headers) -> Head:
    connection = {
        t.strip().lower() for k, v in headers if k.lower() == "connection" for t in v.split(",")
    }
    keep = "close" not in connection
    if head.version == "HTTP/1.0":
        keep = "keep-alive" in connection
    return Head(head.version, headers, head.raw, head.method, head.target, head.status,
                head.reason, keep)


def response_bytes(status: int, reason: str, body: bytes, *, keep_alive: bool = True,
                   content_type: str = "text/plain") -> bytes:
    """A complete response the proxy itself answers with (403, 400, 502...)."""
    lines = [
        f"HTTP/1.1 {status} {reason}",
        f"content-length: {len(body)}",
        f"content-type: {content_type}",
    ]
    if not keep_alive:
        lines.append("connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body

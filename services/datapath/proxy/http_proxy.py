"""The node's transparent HTTP/1.1 proxy (asyncio).

Connections arrive through the redirect with their original destination as the accepted
socket's local address. Each request is checked against every redirecting policy's L7 rules;
a match is forwarded to the original destination (from the client's own address when
``transparent``), anything else is answered ``403 Forbidden`` / ``Access denied`` as Cilium's
Envoy does, and the connection stays usable. Responses go back in request order, so
pipelined requests work even when some are denied locally. Malformed requests get 400, are
logged, and close that one connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from ciliate.flows.model import Wire
from services.datapath.proxy.core.flows import Conn, http_flow
from services.datapath.proxy.core.http import (
    Body,
    End,
    Event,
    Head,
    ParseError,
    Parser,
    response_bytes,
)
from services.datapath.proxy.core.policy import PolicyView, Redirect
from services.datapath.proxy.core.rules import header_pairs
from services.datapath.proxy.netsock import listener, make_socket

log = logging.getLogger(__name__)

HTTP_PROXY_PORT = 15001
ACCESS_DENIED = b"Access denied\r\n"
READ_SIZE = 65536
REASONS = {400: "Bad Request", 403: "Forbidden", 431: "Request Header Fields Too Large",
           501: "Not Implemented", 502: "Bad Gateway", 503: "Service Unavailable",
           505: "HTTP Version Not Supported"}

Address = tuple[str, int]
OriginalDst = Callable[[Address, Address], Address]
"""(client address, accepted socket's local address) -> where the client was connecting."""


@dataclass
class _Local:
    """A response the proxy makes itself."""

    status: int
    head: Head | None
    close: bool
    t0: int


@dataclass
class _Upstream:
    head: Head
    t0: int


@dataclass
class HTTPProxyStats:
    connections: int = 0
    requests: int = 0
    forwarded: int = 0
    denied: int = 0
    malformed: int = 0
    upstream_errors: int = 0


@dataclass
class HTTPProxy:
    view: PolicyView
    emit: Callable[[Wire], None]
    port: int = HTTP_PROXY_PORT
    host: str = "0.0.0.0"
    netns: str | None = None
    transparent: bool = True
    """Listen with IP_TRANSPARENT and connect upstream from the client's address."""
    original_dst: OriginalDst | None = None
    stats: HTTPProxyStats = field(default_factory=HTTPProxyStats)
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self) -> None:
        sock = listener(self.netns, self.host, self.port, transparent=self.transparent)
        if self.port == 0:
            self.port = sock.getsockname()[1]
        self._server = await asyncio.start_server(self._accept, sock=sock)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._tasks):
                task.cancel()
            for task in list(self._tasks):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            await self._server.wait_closed()
            self._server = None

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.stats.connections += 1
        try:
            await _Connection(self, reader, writer).run()
        except (ConnectionError, asyncio.IncompleteReadError, OSError) as exc:
            log.debug("http proxy connection ended: %s", exc)
        except Exception:  # never let one connection take the proxy down
            log.exception("http proxy connection failed")
        finally:
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


class _Connection:
    def __init__(self, proxy: HTTPProxy, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.proxy = proxy
        self.reader = reader
        self.writer = writer
        peer = writer.get_extra_info("peername")
        local = writer.get_extra_info("sockname")
        self.client: Address = (str(peer[0]), int(peer[1]))
        dst = proxy.original_dst(self.client, local) if proxy.original_dst else local
        self.dst: Address = (str(dst[0]), int(dst[1]))
        self.redirects: list[Redirect] = proxy.view.redirects(self.client[0], self.dst[0], 6,
                                                              self.dst[1])
        direction = "ingress" if any(r.direction == "ingress" for r in self.redirects) else (
            "egress" if self.redirects else "ingress")
        self.conn = Conn(self.client[0], self.client[1], self.dst[0], self.dst[1], 6, direction,
                         proxy.port)
        self.slots: asyncio.Queue[_Local | _Upstream | None] = asyncio.Queue()
        self.up_reader: asyncio.StreamReader | None = None
        self.up_writer: asyncio.StreamWriter | None = None
        self.up_parser = Parser(responses=True)
        self.up_events: deque[Event] = deque()
        self.closing = False
        _nodelay(writer)

    # -- requests ----------------------------------------------------------------------------

    def _allowed(self, head: Head) -> bool:
        if not self.redirects:
            return False
        return all(r.rules.allows_http(head) is not None for r in self.redirects)

    async def run(self) -> None:
        responder = asyncio.create_task(self._respond())
        try:
            await self._read_requests()
        finally:
            await self.slots.put(None)
            try:
                await responder
            finally:
                if self.up_writer is not None:
                    self.up_writer.close()

    async def _read_requests(self) -> None:
        parser = Parser()
        forwarding = False
        head: Head | None = None
        while not self.closing:
            data = await self.reader.read(READ_SIZE)
            if self.closing:
                return
            try:
                events = parser.feed(data) if data else parser.eof()
            except ParseError as exc:
                self.proxy.stats.malformed += 1
                log.warning("http proxy: malformed request from %s:%d: %s", *self.client, exc)
                await self.slots.put(_Local(exc.status, None, True, time.time_ns()))
                return
            for ev in events:
                if isinstance(ev, Head):
                    head = ev
                    self.proxy.stats.requests += 1
                    forwarding = self._allowed(ev)
                    now = time.time_ns()
                    self._emit_request(ev, now, forwarding)
                    if forwarding and not await self._forward(ev.raw, ev.method):
                        forwarding = False
                        await self.slots.put(_Local(503, ev, True, now))
                        self.closing = True
                        break
                    if forwarding:
                        self.proxy.stats.forwarded += 1
                        await self.slots.put(_Upstream(ev, now))
                    else:
                        self.proxy.stats.denied += 1
                        await self.slots.put(_Local(403, ev, not ev.keep_alive, now))
                elif isinstance(ev, Body):
                    if forwarding:
                        await self._send_up(ev.raw)
                elif isinstance(ev, End):
                    if forwarding:
                        await self._send_up(ev.raw)
                    if head is not None and not head.keep_alive:
                        self.closing = True
                        break
            if not data:
                return

    async def _forward(self, raw: bytes, method: str) -> bool:
        if self.up_writer is None or self.up_writer.is_closing():
            try:
                await self._connect()
            except OSError as exc:
                self.proxy.stats.upstream_errors += 1
                log.info("http proxy: upstream %s:%d unreachable: %s", *self.dst, exc)
                return False
        self.up_parser.expect(method)
        await self._send_up(raw)
        return True

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        sock = make_socket(self.proxy.netns, socket.SOCK_STREAM,
                           transparent=self.proxy.transparent)
        try:
            if self.proxy.transparent:
                try:
                    sock.bind(self.client)  # the server sees the client's own address and port
                except OSError:
                    sock.bind((self.client[0], 0))
            await loop.sock_connect(sock, self.dst)
        except BaseException:
            sock.close()
            raise
        self.up_reader, self.up_writer = await asyncio.open_connection(sock=sock)
        _nodelay(self.up_writer)
        self.up_parser = Parser(responses=True)
        self.up_events.clear()

    async def _send_up(self, raw: bytes) -> None:
        if raw and self.up_writer is not None:
            self.up_writer.write(raw)
            await self.up_writer.drain()

    # -- responses ---------------------------------------------------------------------------

    async def _respond(self) -> None:
        while (slot := await self.slots.get()) is not None:
            if isinstance(slot, _Local):
                reason = REASONS.get(slot.status, "Error")
                body = ACCESS_DENIED if slot.status == 403 else f"{reason}\r\n".encode()
                self.writer.write(response_bytes(slot.status, reason, body,
                                                 keep_alive=not slot.close))
                await self.writer.drain()
                if slot.head is not None:
                    self._emit_response(slot.head, slot.status, slot.t0, allowed=False)
                if slot.close:
                    self.closing = True
                    self._stop_reading()
                    return
                continue
            status, keep = await self._relay_response()
            self._emit_response(slot.head, status, slot.t0, allowed=True)
            if status == 0 or not keep:
                self.closing = True
                self._stop_reading()
                return

    async def _relay_response(self) -> tuple[int, bool]:
        """Copy one response from upstream to the client; (final status, keep-alive)."""
        status, keep = 0, True
        while True:
            ev = await self._next_up_event()
            if ev is None:
                if status == 0:
                    self.proxy.stats.upstream_errors += 1
                    self.writer.write(response_bytes(502, "Bad Gateway", b"Bad Gateway\r\n",
                                                     keep_alive=False))
                    await self.writer.drain()
                    return 502, False
                return status, False
            self.writer.write(ev.raw)
            if isinstance(ev, Head) and ev.status >= 200:
                status, keep = ev.status, ev.keep_alive
            if isinstance(ev, End):
                await self.writer.drain()
                return status, keep

    async def _next_up_event(self) -> Event | None:
        while not self.up_events:
            if self.up_reader is None:
                return None
            data = await self.up_reader.read(READ_SIZE)
            try:
                events = self.up_parser.feed(data) if data else self.up_parser.eof()
            except ParseError as exc:
                log.info("http proxy: bad response from %s:%d: %s", *self.dst, exc)
                return None
            self.up_events.extend(events)
            if not data and not events:
                return None
        return self.up_events.popleft()

    def _stop_reading(self) -> None:
        self.reader.feed_eof()

    # -- flows -------------------------------------------------------------------------------

    def _url(self, head: Head) -> str:
        host = head.header("host") or self.dst[0]
        return f"http://{host}{head.target}"

    def _emit_request(self, head: Head, now: int, allowed: bool) -> None:
        self.proxy.emit(http_flow(self.proxy.view, self.conn, now_ns=now, method=head.method,
                                  url=self._url(head), protocol=head.version,
                                  headers=header_pairs(head.headers), allowed=allowed))

    def _emit_response(self, head: Head, code: int, t0: int, *, allowed: bool) -> None:
        now = time.time_ns()
        self.proxy.emit(http_flow(self.proxy.view, self.conn, now_ns=now, method=head.method,
                                  url=self._url(head), protocol=head.version, headers=[],
                                  code=code, latency_ns=now - t0, allowed=allowed,
                                  response=True))


def _nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

"""The node's transparent DNS proxy (UDP) and the FQDN learner behind toFQDNs.

A redirected query arrives on an IP_TRANSPARENT socket with its original destination in
IP_ORIGDSTADDR. Queries whose name no ``rules.dns`` entry allows are answered REFUSED; allowed
ones are forwarded to the original server, the answer teaches the FQDN cache (and, through the
``Learner``, identities and ipcache) *before* it is returned to the client, so the client's
next connection already finds its policy. Replies leave from the original server's address.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from ciliate.flows.model import Wire
from services.datapath.proxy.core import dns
from services.datapath.proxy.core.flows import Conn, dns_flow
from services.datapath.proxy.core.fqdn import FQDNCache, identity_labels, prefix_of
from services.datapath.proxy.core.policy import PolicyView
from services.datapath.proxy.netsock import listener, make_socket, orig_dst_from_cmsg

log = logging.getLogger(__name__)

DNS_PROXY_PORT = 15053
UPSTREAM_TIMEOUT = 5.0
RESPONSE_MAX_DELAY = 0.1
"""Cilium's ``tofqdns-proxy-response-max-delay``: how long an answer that taught new IPs is
held for the client's policy to gain them, so its next connection is not dropped."""
MAX_DATAGRAM = 4096

Address = tuple[str, int]
Requester = Callable[[str, dict[str, Any]], Awaitable[Any]]
"""``bus.request``-shaped: (subject, payload) -> reply payload."""


@dataclass
class Learner:
    """FQDN cache -> CIDR identities labelled ``fqdn:<name>`` (identity service over NATS).

    Each IP holds one identity reference for its current name set; a changed set allocates the
    new identity before releasing the old one (the ipcache never goes through a gap), an empty
    set releases it, which removes the ipcache entry.
    """

    request: Requester
    cache: FQDNCache = field(default_factory=FQDNCache)
    held: dict[str, int] = field(default_factory=dict)  # ip -> identity
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def learn(self, name: str, ips: list[str], ttl: int) -> set[int]:
        """Returns the identities newly held for ``ips`` (new IPs or changed name sets)."""
        async with self._lock:
            before = {ip: self.held.get(ip) for ip in ips}
            await self._sync(self.cache.learn(name, ips, ttl, time.time()))
            return {i for ip in ips if (i := self.held.get(ip)) is not None and i != before[ip]}

    async def expire(self) -> None:
        async with self._lock:
            await self._sync(self.cache.expire(time.time()))

    async def _sync(self, changed: set[str]) -> None:
        for ip in sorted(changed):
            names = self.cache.names(ip)
            old = self.held.pop(ip, None)
            if names:
                reply = await self.request("identity.allocate", {
                    "labels": [identity_labels(ip, names)], "prefixes": [prefix_of(ip)]})
                self.held[ip] = int(reply["ids"][0])
            if old is not None and old != self.held.get(ip):
                await self.request("identity.release", {"ids": [old]})

    async def run_expiry(self, stop: asyncio.Event) -> None:
        """Expire records as their time comes (wakes at the next expiry, at most each second)."""
        while not stop.is_set():
            nxt = self.cache.next_expiry()
            delay = 1.0 if nxt is None else min(1.0, max(0.0, nxt - time.time()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=delay)
            await self.expire()

    async def release_all(self) -> None:
        async with self._lock:
            ids = sorted(set(self.held.values()))
            self.held.clear()
            if ids:
                await self.request("identity.release", {"ids": ids})


@dataclass
class DNSProxyStats:
    queries: int = 0
    allowed: int = 0
    refused: int = 0
    malformed: int = 0
    upstream_errors: int = 0


@dataclass
class DNSProxy:
    view: PolicyView
    emit: Callable[[Wire], None]
    learner: Learner | None = None
    port: int = DNS_PROXY_PORT
    host: str = "0.0.0.0"
    netns: str | None = None
    transparent: bool = True
    original_dst: Callable[[Address], Address] | None = None
    """For tests without the redirect: client address -> the server it meant."""
    stats: DNSProxyStats = field(default_factory=DNSProxyStats)
    response_max_delay: float = RESPONSE_MAX_DELAY
    _sock: socket.socket | None = None
    _policy_changed: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self) -> None:
        self._sock = listener(self.netns, self.host, self.port, socket.SOCK_DGRAM,
                              transparent=self.transparent)
        if self.port == 0:
            self.port = self._sock.getsockname()[1]
        self.view.policy_listeners.append(self._on_policy)
        asyncio.get_running_loop().add_reader(self._sock.fileno(), self._readable)

    def _on_policy(self, _identity: int) -> None:
        self._policy_changed.set()

    async def _await_policy(self, client_ip: str, idents: set[int]) -> None:
        """Hold the answer until the client's egress policy holds entries for the learned
        identities, at most ``response_max_delay`` (names no toFQDNs selects never appear)."""
        ep = self.view.local_endpoint(client_ip)
        if ep is None or not idents:
            return
        deadline = time.monotonic() + self.response_max_delay
        while not all(self.view.has_peer(ep.identity, i) for i in idents):
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._policy_changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._policy_changed.wait(), left)

    async def stop(self) -> None:
        with contextlib.suppress(ValueError):
            self.view.policy_listeners.remove(self._on_policy)
        if self._sock is not None:
            asyncio.get_running_loop().remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def _readable(self) -> None:
        assert self._sock is not None
        while True:
            try:
                data, anc, _flags, client = self._sock.recvmsg(MAX_DATAGRAM, 256)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("dns proxy: receive failed: %s", exc)
                return
            dst = orig_dst_from_cmsg(anc)
            if self.original_dst is not None:
                dst = self.original_dst(client)
            if dst is None:
                continue
            task = asyncio.create_task(self._handle(data, (client[0], client[1]), dst))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _handle(self, data: bytes, client: Address, server: Address) -> None:
        self.stats.queries += 1
        t0 = time.time_ns()
        redirects = self.view.redirects(client[0], server[0], 17, server[1])
        direction = "egress" if any(r.direction == "egress" for r in redirects) else "ingress"
        conn = Conn(client[0], client[1], server[0], server[1], 17, direction, self.port)
        try:
            query = dns.decode(data)
        except dns.DNSError as exc:
            self.stats.malformed += 1
            log.info("dns proxy: malformed query from %s:%d: %s", *client, exc)
            reply = dns.refused(data)
            if reply:
                self._reply(reply, client, server)
            return
        qname = query.questions[0].name if query.questions else "."
        qtypes = [query.type_name(q.qtype) for q in query.questions]
        allowed = bool(redirects) and all(r.rules.allows_dns(qname) for r in redirects)
        self.emit(dns_flow(self.view, conn, now_ns=t0, query=qname, qtypes=qtypes,
                           allowed=allowed))
        if not allowed:
            self.stats.refused += 1
            self._reply(dns.encode(dns.response(query, dns.Rcode.REFUSED)), client, server)
            now = time.time_ns()
            self.emit(dns_flow(self.view, conn, now_ns=now, query=qname, qtypes=qtypes,
                               rcode=dns.Rcode.REFUSED, latency_ns=now - t0, allowed=False,
                               response=True))
            return
        self.stats.allowed += 1
        try:
            raw = await self._ask(data, server)
            answer = dns.decode(raw)
        except (OSError, TimeoutError, dns.DNSError) as exc:
            self.stats.upstream_errors += 1
            log.info("dns proxy: upstream %s:%d failed: %s", *server, exc)
            self._reply(dns.encode(dns.response(query, dns.Rcode.SERVFAIL)), client, server)
            return
        ips = answer.ips
        ttl = min((r.ttl for r in answer.answers), default=0)
        if self.learner is not None and ips and answer.rcode == dns.Rcode.NOERROR:
            try:
                await self._await_policy(client[0], await self.learner.learn(qname, ips, ttl))
            except Exception:
                log.exception("dns proxy: learning %s failed", qname)
        self._reply(raw, client, server)
        now = time.time_ns()
        self.emit(dns_flow(
            self.view, conn, now_ns=now, query=qname, qtypes=qtypes, rcode=answer.rcode, ips=ips,
            ttl=ttl, cnames=[r.data for r in answer.answers if r.rtype == dns.RRType.CNAME],
            rrtypes=sorted({answer.type_name(r.rtype) for r in answer.answers}),
            latency_ns=now - t0, allowed=True, response=True))

    async def _ask(self, data: bytes, server: Address) -> bytes:
        loop = asyncio.get_running_loop()
        sock = make_socket(self.netns, socket.SOCK_DGRAM)
        try:
            await loop.sock_connect(sock, server)
            await loop.sock_sendall(sock, data)
            return await asyncio.wait_for(loop.sock_recv(sock, MAX_DATAGRAM), UPSTREAM_TIMEOUT)
        finally:
            sock.close()

    def _reply(self, data: bytes, client: Address, server: Address) -> None:
        """Answer from the server's address (transparent) or from the proxy socket."""
        if not self.transparent:
            assert self._sock is not None
            self._sock.sendto(data, client)
            return
        sock = make_socket(self.netns, socket.SOCK_DGRAM, transparent=True)
        try:
            sock.bind(server)
            sock.sendto(data, client)
        except OSError as exc:
            log.info("dns proxy: reply to %s:%d failed: %s", *client, exc)
        finally:
            sock.close()

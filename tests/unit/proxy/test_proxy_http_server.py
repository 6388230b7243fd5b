"""The asyncio HTTP proxy on loopback (no redirect: the original destination is given)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from ciliate.flows.model import Flow
from ciliate.flows.tables import FlowType, Verdict
from services.datapath.proxy.core.policy import PolicyView
from services.datapath.proxy.demo import serve_deathstar
from services.datapath.proxy.http_proxy import HTTPProxy

CLIENT, SERVER = "127.0.0.1", "127.0.0.1"


@pytest.fixture
async def setup() -> AsyncIterator[tuple[HTTPProxy, list[dict[str, Any]]]]:
    server = await serve_deathstar("127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    view = PolicyView(node="n1")
    view.set_endpoint("default.deathstar", {"identity": 1000, "ips": [SERVER], "node": "n1",
                                            "namespace": "default", "name": "deathstar-1"})
    view.set_policy("1000", {"identity": 1000, "enforce": {"ingress": True}, "entries": [
        {"peer": 0, "direction": "ingress", "proto": 6, "port": port, "port_prefixlen": 16,
         "deny": False, "proxy_port": 15001, "cookies": ["rule1"],
         "l7": {"http": [{"method": "POST", "path": "/v1/request-landing"}]}}]})
    flows: list[dict[str, Any]] = []
    proxy = HTTPProxy(view, flows.append, port=0, host="127.0.0.1", transparent=False,
                      original_dst=lambda _c, _l: (SERVER, port))
    await proxy.start()
    yield proxy, flows
    await proxy.stop()
    server.close()
    await server.wait_closed()


async def exchange(port: int, raw: bytes, responses: int) -> list[bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    out: list[bytes] = []
    for _ in range(responses):
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length"))
        out.append(head.split(b"\r\n")[0] + b"|" + await reader.readexactly(length))
    writer.close()
    return out


LAND = b"POST /v1/request-landing HTTP/1.1\r\nHost: deathstar\r\nContent-Length: 0\r\n\r\n"
EXHAUST = b"PUT /v1/exhaust-port HTTP/1.1\r\nHost: deathstar\r\nContent-Length: 0\r\n\r\n"


async def test_allowed_forwarded_denied_403_pipelined_in_order(
    setup: tuple[HTTPProxy, list[dict[str, Any]]],
) -> None:
    proxy, flows = setup
    got = await exchange(proxy.port, LAND + EXHAUST + LAND, 3)
    assert got == [b"HTTP/1.1 200 OK|Ship landed\n", b"HTTP/1.1 403 Forbidden|Access denied\r\n",
                   b"HTTP/1.1 200 OK|Ship landed\n"]
    parsed = [Flow.from_wire(w) for w in flows]
    assert all(f.type == FlowType.L7 for f in parsed)
    requests = [f for f in parsed if not f.is_reply]
    assert [(f.l7.http.method, f.verdict) for f in requests if f.l7 and f.l7.http] == [
        ("POST", Verdict.FORWARDED), ("PUT", Verdict.DROPPED), ("POST", Verdict.FORWARDED)]
    codes = sorted(f.l7.http.code for f in parsed if f.is_reply and f.l7 and f.l7.http)
    assert codes == [200, 200, 403]
    assert all(f.destination.pod_name == "deathstar-1" for f in requests)
    assert requests[0].l7 is not None and requests[0].l7.http is not None
    assert requests[0].l7.http.url == "http://deathstar/v1/request-landing"


async def test_chunked_body_forwarded(setup: tuple[HTTPProxy, list[dict[str, Any]]]) -> None:
    proxy, _ = setup
    chunked = (b"POST /v1/request-landing HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"4\r\nship\r\n0\r\n\r\n")
    assert await exchange(proxy.port, chunked, 1) == [b"HTTP/1.1 200 OK|Ship landed\n"]


async def test_malformed_gets_400_and_proxy_keeps_serving(
    setup: tuple[HTTPProxy, list[dict[str, Any]]],
) -> None:
    proxy, _ = setup
    got = await exchange(proxy.port, b"BROKEN\r\n\r\n", 1)
    assert got[0].startswith(b"HTTP/1.1 400 Bad Request")
    assert proxy.stats.malformed == 1
    assert await exchange(proxy.port, LAND, 1) == [b"HTTP/1.1 200 OK|Ship landed\n"]

"""Concurrent TCP/UDP reachability probes from inside pod network namespaces.

Sockets are created inside the source pod's namespace (setns on this thread, then back), then
driven by asyncio from here: hundreds of probes run at once from one process.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from pyroute2 import netns


@dataclass(frozen=True)
class Probe:
    src_netns: str
    dst_ip: str
    port: int
    proto: str  # "TCP" | "UDP"


@contextlib.contextmanager
def in_netns(name: str) -> Iterator[None]:
    netns.pushns(name)
    try:
        yield
    finally:
        netns.popns()


def socket_in(name: str, kind: socket.SocketKind) -> socket.socket:
    with in_netns(name):
        s = socket.socket(socket.AF_INET, kind)
    s.setblocking(False)
    return s


async def probe_tcp(sock: socket.socket, ip: str, port: int, timeout: float) -> bool:
    loop = asyncio.get_running_loop()
    try:
        await asyncio.wait_for(loop.sock_connect(sock, (ip, port)), timeout)
    except (OSError, TimeoutError):
        return False
    finally:
        sock.close()
    return True


async def probe_udp(sock: socket.socket, ip: str, port: int, timeout: float) -> bool:
    """Send a datagram and wait for its echo."""
    loop = asyncio.get_running_loop()
    payload = b"ciliate-probe"
    try:
        sock.connect((ip, port))
        await loop.sock_sendall(sock, payload)
        data = await asyncio.wait_for(loop.sock_recv(sock, 256), timeout)
    except (OSError, TimeoutError):
        return False
    finally:
        sock.close()
    return data == payload


async def run_probes(probes: Iterable[Probe], timeout: float = 1.5) -> list[bool]:
    """All probes at once; a probe that gets no answer within ``timeout`` is unreachable."""
    tasks = []
    for p in probes:
        if p.proto == "TCP":
            s = socket_in(p.src_netns, socket.SOCK_STREAM)
            tasks.append(probe_tcp(s, p.dst_ip, p.port, timeout))
        else:
            s = socket_in(p.src_netns, socket.SOCK_DGRAM)
            tasks.append(probe_udp(s, p.dst_ip, p.port, timeout))
    return list(await asyncio.gather(*tasks))
